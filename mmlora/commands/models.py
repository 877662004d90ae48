"""``mmlora models``: list the tiny presets, build one, or build a tiny random instance of any
image-text-to-text architecture in transformers.

    mmlora models list
    mmlora models build tiny-llava --out models/tiny-llava
    mmlora models tiny qwen2_vl --out models/tiny-qwen2-vl
    mmlora models info llava-hf/llava-1.5-7b-hf      # offline: fails at once unless cached
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="show the model presets")
    build = sub.add_parser("build", help="build a preset (random weights) and save it with save_pretrained")
    build.add_argument("name", help="preset name (see 'mmlora models list')")
    build.add_argument("--out", type=Path, help="folder to write; default: print the cached build's folder")
    build.add_argument("--seed", type=int, default=0)
    info = sub.add_parser("info", help="where a model reference resolves and what its config says")
    info.add_argument("ref", help="a preset name, a local folder, or a Hugging Face id in the local cache")
    tiny = sub.add_parser("tiny", help="a tiny random model of any image-text-to-text model type")
    tiny.add_argument("model_type", help="a transformers model type, e.g. llava, qwen2_vl, idefics3")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from mmlora.models.presets import PRESETS, build_preset, preset_path

    if args.models_command == "list":
        width = max(len(n) for n in PRESETS)
        kinds = max(len(p.kind) for p in PRESETS.values())
        print(f"{'name':<{width}}  {'kind':<{kinds}}  description")
        for p in PRESETS.values():
            print(f"{p.name:<{width}}  {p.kind:<{kinds}}  {p.description}")
        return 0
    if args.models_command == "build":
        if args.name not in PRESETS:
            from mmlora.errors import MmloraError

            raise MmloraError(f"unknown preset {args.name!r}; known: {', '.join(PRESETS)}")
        path = build_preset(args.name, args.out, args.seed) if args.out else preset_path(args.name, args.seed)
        print(path)
        return 0
    if args.models_command == "info":
        return _info(args.ref)
    from mmlora.errors import MmloraError
    from mmlora.models.families import FAMILIES, check_out_dir, save_family
    from mmlora.models.tiny_any import build_tiny, image_text_to_text_types

    if args.model_type not in image_text_to_text_types():
        raise MmloraError(f"{args.model_type!r} is not an image-text-to-text model type in this transformers")
    if args.model_type in FAMILIES:  # model + processor: trains and generates
        model = save_family(args.model_type, args.out, seed=args.seed, force=args.force)
        note = "model and processor"
    else:  # no processor recipe for this family: the architecture only, for planning placements
        check_out_dir(args.out, args.force)
        model = build_tiny(args.model_type, seed=args.seed)
        model.save_pretrained(args.out)
        note = f"model only, no processor (families with one: {', '.join(FAMILIES)})"
    print(f"{args.out}  ({sum(p.numel() for p in model.parameters()):,} parameters; {note})")
    return 0


def _info(ref: str) -> int:
    import json

    from mmlora.models.loading import resolve_pretrained

    path = resolve_pretrained(ref)
    print(f"{ref} -> {path}")
    clip_cfg = Path(path) / "open_clip_config.json"
    if clip_cfg.is_file():
        cfg = json.loads(clip_cfg.read_text())["model_cfg"]
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        print(f"open_clip CLIP: embed {cfg['embed_dim']}; vision {v['layers']}x{v['width']} at {v['image_size']} px, "
              f"patch {v['patch_size']}; text {t['layers']}x{t['width']}, vocab {t['vocab_size']}")
        return 0
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    print(f"model_type: {config.model_type}; architectures: {', '.join(config.architectures or [])}")
    for name in ("vision_config", "text_config"):
        sub = getattr(config, name, None)
        if sub is not None:
            layers = getattr(sub, "num_hidden_layers", "?")
            print(f"{name}: {sub.model_type}, {layers} layers, width {getattr(sub, 'hidden_size', '?')}")
    return 0
