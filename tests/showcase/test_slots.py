"""Novel-concept recall: world B's new shape and colour, named right at their objects' positions."""

from mmlora.showcase.slots import NOVEL, novel_recall


def test_novel_recall_counts_novel_objects_named_at_their_position():
    assert NOVEL == {"shape": "star", "colour": "purple"}
    objects = {1: [{"shape": "star", "colour": "purple", "position": "top left"},
                   {"shape": "circle", "colour": "purple", "position": "bottom right"}],
               2: [{"shape": "star", "colour": "red", "position": "center"}]}
    captions = {1: "a purple star in the top left and a red circle in the bottom right.", 2: "a red square in the center."}
    assert novel_recall(captions, objects) == {"novel_shape": 0.5, "novel_colour": 0.5}
    # a star named at the wrong position is not recalled; without any novel object the recall is unknown
    assert novel_recall({2: "a red star in the top left."}, {2: objects[2]})["novel_shape"] == 0.0
    assert novel_recall({3: "a red circle."}, {3: [{"shape": "circle", "colour": "red", "position": "center"}]}) == {
        "novel_shape": None, "novel_colour": None}
