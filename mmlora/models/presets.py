"""Named tiny model presets, built from config (no download) and cached on disk.

``mmlora models list`` shows them; ``mmlora models build NAME --out DIR`` writes one; any command that
takes a model accepts a preset name wherever it accepts a checkpoint folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmlora.cache import cached_dir
from mmlora.errors import MmloraError
from mmlora.models.clip import build_tiny_clip, save_clip
from mmlora.models.families import save_family
from mmlora.models.llava import TinyLlavaSpec, build_tiny_llava, save_llava
from mmlora.optional import require

_BUILDER_SOURCES = (
    "models/llava.py",
    "models/clip.py",
    "models/tokenizer.py",
    "models/presets.py",
    "models/open_clip_configs/mmlora-clip-tiny.json",
    "models/open_clip_configs/mmlora-clip-shapes.json",
    "models/corpus.py",
    "models/tokenizer_corpus.txt.gz",
    "models/families.py",
    "models/tiny_any.py",
)


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "llava" | "clip" | "family" (a transformers VLM family, mmlora.models.families)
    description: str
    llava: TinyLlavaSpec | None = None
    clip_arch: str | None = None
    #: Folder name under ``mmlora/bases/`` for pretrained weights shipped in the repository.
    shipped: str | None = None
    #: Model type of a ``family`` preset, built by :func:`mmlora.models.families.save_family`.
    family: str | None = None
    extra: dict = field(default_factory=dict)

    def params(self) -> dict:
        return {"name": self.name, "llava": asdict(self.llava) if self.llava else None, "clip": self.clip_arch,
                "family": self.family}


#: One ``tiny-<type>`` preset per VLM family with a processor recipe (same order as ``families.FAMILIES``).
_FAMILY_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "llava_next",
                 "llava_onevision", "internvl", "mllama", "gemma4")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llava", "llava", "LLaVA for tests: CLIP 2x32 at 32 px (16 image tokens), Llama 2x64", llava=TinyLlavaSpec()),
        Preset(
            "shapes-llava",
            "llava",
            "LLaVA for the shapes world: CLIP 4x128 at 64 px (64 image tokens), Llama 4x256 (~4.5M params)",
            llava=TinyLlavaSpec(
                image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                lm_width=256, lm_layers=4, lm_heads=8, lm_kv_heads=4, lm_intermediate=688, split_punctuation=True,
            ),
        ),
        Preset("tiny-clip", "clip", "open_clip CLIP for tests: ViT 2x32 at 64 px, text 2x32", clip_arch="mmlora-clip-tiny"),
        Preset(
            "shapes-clip", "clip", "open_clip CLIP for the shapes world: ViT 4x128 at 64 px (8x8 patches, the LLaVA tower's grid), text 4x128",
            clip_arch="mmlora-clip-shapes",
        ),
        Preset("shapes-llava-base", "llava", "shapes-llava pretrained on world A (shipped; see its README)",
               shipped="shapes-llava-base"),
        Preset("shapes-clip-base", "clip", "shapes-clip pretrained on world A (shipped; see its README)",
               shipped="shapes-clip-base"),
        *(Preset(f"tiny-{t}", "family", f"tiny {t} with its own processor (as `mmlora models tiny {t}` writes)",
                 family=t) for t in _FAMILY_TYPES),
    )
}

BASES_DIR = Path(__file__).resolve().parents[1] / "bases"


def build_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build preset ``name`` with random weights from ``seed`` and save it to ``out_dir``."""
    if name not in PRESETS:
        raise MmloraError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if preset.shipped:
        shutil.copytree(shipped_path(preset), out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    if preset.kind == "family":
        save_family(preset.family, out_dir, seed=seed, force=True)
        return Path(out_dir)
    if preset.kind == "llava":
        model, processor = build_tiny_llava(preset.llava, seed=seed)
        return save_llava(model, processor, out_dir)
    model, tokenizer, cfg = build_tiny_clip(preset.clip_arch, seed=seed)
    return save_clip(model, tokenizer, cfg, out_dir)


def shipped_path(preset: Preset) -> Path:
    path = BASES_DIR / preset.shipped
    if not (path / "README.md").is_file():
        raise MmloraError(f"the shipped base {preset.name!r} is missing at {path}; regenerate it with "
                          "python scripts/pretrain_bases.py")
    return path


def preset_path(name: str, seed: int = 0) -> Path:
    """The folder of preset ``name``: shipped weights in the repository, or a build from config
    cached on first use (see ``mmlora.cache``)."""
    if PRESETS[name].shipped:
        return shipped_path(PRESETS[name])
    import importlib.metadata

    import transformers

    if PRESETS[name].kind == "clip":
        clip_version: str | None = require("open_clip", "clip", f"the {name} preset").__version__
    else:  # LLaVA presets build without open_clip; its version (when installed) stays in the cache key
        try:
            clip_version = importlib.metadata.version("open_clip_torch")
        except importlib.metadata.PackageNotFoundError:
            clip_version = None
    params = PRESETS[name].params() | {
        "seed": seed, "transformers": transformers.__version__, "open_clip": clip_version,
    }
    build: Callable[[Path], None] = lambda tmp: build_preset(name, tmp, seed)  # noqa: E731
    import torch

    # Building seeds torch's generator; fork it so that a first use (a build) leaves the caller's
    # random state as a later use (a cache hit) does: a run's first training is then reproducible.
    with torch.random.fork_rng(devices=[]):
        return cached_dir(f"preset-{name}", params, _BUILDER_SOURCES, build)
