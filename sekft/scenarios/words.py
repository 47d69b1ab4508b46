"""The closed list of words every seed-varied argument is drawn from.

A tiny base model learns to copy a whole token from an observation into a command long
before it learns to copy an arbitrary string character by character; so every name, value or
path part that an expert types after reading it somewhere is one of these common lowercase
words, each of which a small BPE vocabulary trained on the recorded data keeps as a single
token. None of them is the name of a command on a Debian system (`type -t` finds nothing).
"""

from __future__ import annotations

WORDS: tuple[str, ...] = (
    "apple", "acorn", "amber", "anchor", "angel", "ankle", "arrow", "atlas", "autumn", "badge",
    "bagel", "baker", "bamboo", "banana", "band", "banner", "barley", "barn", "basket", "bead",
    "beach", "bean", "bear", "beaver", "bell", "berry", "bird", "biscuit", "blanket", "bloom",
    "boat", "bone", "book", "boot", "bottle", "bowl", "box", "branch", "bread", "brick",
    "brook", "broom", "bubble", "bucket", "button", "cabin", "cactus", "cake", "camel",
    "camera", "camp", "candle", "canoe", "canyon", "cape", "card", "carpet", "carrot", "castle",
    "cave", "cedar", "chair", "chalk", "cherry", "chess", "chest", "chimney", "circle", "city",
    "clay", "cliff", "clock", "cloud", "clover", "coast", "coat", "cobalt", "coffee", "coin",
    "comet", "copper", "coral", "corn", "cotton", "cow", "crab", "crane", "crayon", "cream",
    "crown", "cup", "curtain", "daisy", "dawn", "deer", "desert", "desk", "diamond", "dinner",
    "dock", "dolphin", "door", "dove", "dragon", "drum", "duck", "dune", "eagle", "earth",
    "egg", "elbow", "elm", "ember", "engine", "falcon", "farm", "feather", "fence", "fern",
    "field", "fig", "finch", "fire", "flag", "flame", "flute", "fog", "forest", "fork",
    "fossil", "fox", "frog", "frost", "fruit", "garden", "garlic", "gate", "gem", "ginger",
    "glass", "glove", "goat", "goose", "grape", "grass", "gravel", "guitar", "hammer", "harbor",
    "harp", "hat", "hawk", "hazel", "heart", "hill", "honey", "horn", "horse", "house", "ice",
    "island", "ivory", "ivy", "jacket", "jade", "jelly", "jewel", "juice", "kettle", "kite",
    "kiwi", "ladder", "lake", "lamp", "lantern", "leaf", "lemon", "lily", "lime", "linen",
    "lion", "lizard", "lobster", "lotus", "mango", "maple", "marble", "meadow", "melon", "mint",
    "mirror", "moon", "moss", "moth", "mountain", "mouse", "mud", "mule", "nest", "needle",
    "nickel", "night", "north", "oak", "oasis", "ocean", "olive", "onion", "orange", "orbit",
    "otter", "owl", "oyster", "paddle", "palm", "paper", "parrot", "pasta", "peach", "pear",
    "pearl", "pebble", "pencil", "penguin", "pepper", "piano", "pickle", "pigeon", "pillow",
    "pine", "planet", "plum", "pond", "poppy", "potato", "pumpkin", "quartz", "quill", "rabbit",
    "radish", "rain", "raven", "reed", "ribbon", "rice", "ring", "river", "road", "robin",
    "rocket", "rose", "ruby", "saddle", "sage", "salmon", "salt", "sand", "scarf", "seal",
    "seed", "shell", "ship", "silk", "silver", "skate", "sky", "sled", "snow", "socket", "sofa",
    "spoon", "spring", "spruce", "squid", "star", "stone", "storm", "straw", "stream", "sugar",
    "summer", "sun", "swan", "table", "tea", "thistle", "thunder", "tiger", "timber", "toast",
    "tomato", "topaz", "tower", "train", "tree", "trout", "tulip", "tunnel", "turtle", "valley",
    "velvet", "violet", "wagon", "walnut", "water", "wave", "wheat", "whale", "willow",
    "window", "winter", "wolf", "wool", "yarn", "zebra",
)
