"""Generate the two small text-classification tasks that `make demo` trains on.

The sentences are written from templates and word lists in this file with a fixed seed, so
the data is reproducible and free of licensing questions; it is synthetic and easy on
purpose (the demo shows the pipeline, not a research result). Run:

    python scripts/make_demo_data.py   # writes onnx_peft/demo_data/{sentiment,topic}_{train,test}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "onnx_peft" / "demo_data"

SUBJECTS = ["the movie", "this phone", "the hotel", "our dinner", "the concert", "that book", "the new update",
            "the service", "this laptop", "the trip", "the coffee", "the game", "the course", "the show"]
# Four sentiment grades, so both tasks have four labels and their heads share one shape.
SENTIMENT_WORDS = {
    "very_positive": ["wonderful", "fantastic", "brilliant", "superb", "outstanding", "amazing"],
    "positive": ["good", "nice", "pleasant", "decent", "fine", "enjoyable"],
    "negative": ["poor", "boring", "mediocre", "disappointing", "dull", "weak"],
    "very_negative": ["terrible", "awful", "horrible", "dreadful", "atrocious", "abysmal"],
}
SENTIMENT_TEMPLATES = ["{s} was {a}.", "honestly, {s} felt {a} from start to finish.", "I found {s} {a}.",
                       "everyone agreed that {s} was {a}.", "{s} turned out {a}, as expected.",
                       "what a {a} experience {s} was.", "my friends said {s} is {a}."]

TOPICS = {
    "sports": ["the striker scored twice", "the team won the final", "the coach changed tactics",
               "the marathon runners crossed the line", "the referee showed a red card", "the tennis match went to five sets"],
    "technology": ["the chip doubles battery life", "the startup released an open source compiler",
                   "engineers patched the security flaw", "the new GPU trains models faster",
                   "the app now syncs across devices", "researchers built a faster database"],
    "food": ["the chef roasted the vegetables", "this soup needs more salt", "the bakery sells fresh bread",
             "we cooked pasta with garlic", "the restaurant serves spicy noodles", "the dessert was made with dark chocolate"],
    "travel": ["our flight landed in lisbon", "the train crossed the alps", "we booked a cabin by the lake",
               "the museum tour lasted all day", "the ferry sailed to the island", "we hiked to the old castle"],
}
TOPIC_TEMPLATES = ["{t}.", "news today: {t}.", "I read that {t}.", "apparently {t} yesterday.",
                   "{t}, according to the report.", "people were talking about how {t}."]


def sentiment(rng: random.Random, n: int) -> list[dict]:
    rows = []
    labels = sorted(SENTIMENT_WORDS)
    for i in range(n):
        label = labels[i % len(labels)]
        words = SENTIMENT_WORDS[label]
        text = rng.choice(SENTIMENT_TEMPLATES).format(s=rng.choice(SUBJECTS), a=rng.choice(words))
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    rng.shuffle(rows)
    return rows


def topic(rng: random.Random, n: int) -> list[dict]:
    rows = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        text = rng.choice(TOPIC_TEMPLATES).format(t=rng.choice(TOPICS[label]))
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    rng.shuffle(rows)
    return rows


def write(name: str, rows: list[dict]) -> None:
    path = OUT / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261122)
    for task, make in (("sentiment", sentiment), ("topic", topic)):
        rows = make(rng, 400)
        write(f"{task}_train.jsonl", rows[:300])
        write(f"{task}_test.jsonl", rows[300:])


if __name__ == "__main__":
    main()
