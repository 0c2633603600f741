"""Regenerate examples/prompts.parquet: a few dozen varied prompts (subjects, styles, lengths, negatives)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    (
        "a photo of a kangaroo wearing an orange hoodie and blue sunglasses standing in front of the eiffel tower "
        'holding a sign that says "very deep learning"',
        "",
    ),
    ("an oil painting of a lighthouse on a cliff at dawn", "blurry, low quality"),
    ("a macro photo of a dew drop on a green leaf", ""),
    ("a watercolor of a red fox sleeping in the snow", "text, watermark"),
    ("a neon-lit street in tokyo at night, rain, cinematic", ""),
    ("a bowl of ramen on a wooden table, studio lighting", ""),
    ("an isometric drawing of a tiny castle on a floating island", ""),
    ("a red vintage car parked on a beach at sunset", "people"),
    ("a portrait of an old fisherman with a white beard, black and white photo", ""),
    ("a robot reading a book in a library, digital art", ""),
    ("a field of sunflowers under a stormy sky", ""),
    ("a cat wearing a tiny wizard hat, detailed illustration", "dark"),
    ("a mountain lake reflecting snowy peaks, morning fog", ""),
    ("a cup of coffee with latte art shaped like a heart", ""),
    ("a medieval map of an imaginary kingdom", ""),
    ("a hummingbird hovering near a purple flower, high speed photo", ""),
    ("a futuristic city with flying cars, concept art", "blurry"),
    ("a child flying a kite on a windy hill", ""),
    ("a stack of pancakes with blueberries and maple syrup", ""),
    ("an astronaut riding a horse on the moon", ""),
    ("a cozy cabin in a pine forest at night with warm light in the windows", ""),
    ("a sailboat on a calm blue sea", ""),
    ("a close-up of a tiger's eye", ""),
    ("a steampunk pocket watch with visible gears", ""),
    ("a street market in marrakech, vibrant colors", "low resolution"),
    ("a paper origami crane on a white table", ""),
    ("a dragon made of autumn leaves", ""),
    ("a minimalist poster of a whale, flat design", ""),
    ("a snowy village with a church, christmas card style", ""),
    ("a jellyfish glowing in the deep ocean", ""),
    ("a bicycle leaning against a yellow wall in havana", ""),
    ("a bowl of fruit in the style of cezanne", ""),
    ("a panda eating bamboo, national geographic photo", ""),
    ("a desert with sand dunes and a single cactus", ""),
    ("a chess board mid-game, dramatic side light", ""),
    ("a treehouse with a rope ladder in a giant oak", ""),
]

if __name__ == "__main__":
    table = pa.table({"prompt": [p for p, _ in PROMPTS], "negative_prompt": [n for _, n in PROMPTS]})
    pq.write_table(table, Path(__file__).with_name("prompts.parquet"))
    print(f"wrote {table.num_rows} prompts")
