"""Passkey and needle-in-a-haystack retrieval: a 5-digit key hidden at several depths of a long prompt.

    rows = run_passkey(model, tokenizer, lengths=[1024, 2048], depths=[0.0, 0.5, 1.0], trials=5,
                       haystack=None, seed=0)        # haystack=None: "passkey" (filler); a text: "needle"
    heatmap(rows, "passkey.png", "smollm2-135m, dense")

The prompt (`make_passkey_prompt`) is an instruction, a haystack with the needle sentence
"The pass key is {key}. Remember it. {key} is the pass key." inserted at a sentence boundary, and the
question "What is the pass key?" followed by the answer prefix "The pass key is", so that a greedy
model continues with the digits. A trial succeeds when the key appears in the generated text. Run the
same sweep on the dense path (`kvpass.Config()`) and on a method to compare success per (length, depth).
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch

from .lengths import check_length

__all__ = ["FILLER", "INSTRUCTION", "QUESTION", "ANSWER_PREFIX", "needle_sentence", "make_key",
           "make_passkey_prompt", "run_passkey", "heatmap"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
_PLACEHOLDER = "\x00HAYSTACK\x00"


def needle_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_key(rng: random.Random) -> str:
    """Five random digits (10000..99999, so never a leading zero) from `rng`."""
    return str(rng.randint(10000, 99999))


def _sentences(text: str) -> list[str]:
    """Whitespace collapsed, split at the space after '.', '!' or '?' (or one closing quote/bracket after
    them), except after a lone capital's period (an initial: "J. Smith")."""
    return [s for s in re.split(r"(?<=[.!?])(?<!\b[A-Z]\.)\s+|(?<=[.!?][\"')\]])\s+", " ".join(text.split())) if s]


def _frame(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack (instruction, question, answer prefix, chat markup)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template; use chat=False")
        content = f"{INSTRUCTION}\n\n{_PLACEHOLDER}\n\n{QUESTION}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        text += ANSWER_PREFIX
        special = False   # the template already holds whatever special tokens the model expects
    else:
        text = f"{INSTRUCTION}\n\n{_PLACEHOLDER}\n\n{QUESTION} {ANSWER_PREFIX}"
        special = True    # BOS where the tokenizer adds one
    head, tail = text.split(_PLACEHOLDER)
    head_ids = tokenizer(head, add_special_tokens=special)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if special and head_ids and head_ids[-1] == getattr(tokenizer, "eos_token_id", None) and tokenizer.eos_token_id \
            != getattr(tokenizer, "bos_token_id", None):
        head_ids = head_ids[:-1]   # a tokenizer that appends EOS: not in the middle of a prompt
    return list(head_ids), list(tail_ids)


def make_passkey_prompt(tokenizer, length: int, depth: float, key: str, *, haystack: str | None = None,
                        chat: bool) -> tuple[torch.Tensor, str]:
    """A passkey (haystack=None: the classic filler) or needle (haystack: an essay text) prompt.

    Layout: [chat markup] instruction, blank line, haystack with the needle sentence, blank line,
    "What is the pass key?" [end of user turn, assistant turn] "The pass key is". With `chat=True` the
    instruction, haystack and question are the user turn of the tokenizer's chat template and the answer
    prefix opens the assistant turn; with `chat=False` it is plain text (BOS where the tokenizer adds one).

    Length: the result has exactly `length` tokens. The haystack is whole sentences (repeated from the
    start when the text is too short) and its last sentence is cut at a token to fill the budget exactly;
    the pieces (frame, sentences, needle) are tokenized separately and concatenated, which for byte-level
    BPE tokenizers is the tokenization of the joined text up to merges across those boundaries.

    Depth: the needle goes at the sentence boundary nearest to `depth` x (haystack tokens): 0 before the
    first haystack sentence, 1 after the last; the needle's relative position within the haystack is
    within half a sentence of `depth`.

    Returns `(input_ids of shape (1, length), key)`.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1] (0 = start of the haystack, 1 = its end)")
    if not (isinstance(key, str) and key.isdigit()):
        raise ValueError(f"key={key!r}: must be a string of digits")
    sentences = _sentences(FILLER if haystack is None else haystack)
    if not sentences:
        raise ValueError("haystack has no text")
    head, tail = _frame(tokenizer, chat)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    spaced = [encode(" " + s) for s in sentences]   # a sentence after another one
    first = encode(sentences[0])                       # the haystack's first token follows a blank line

    def fill(budget, start_spaced):
        """Sentences (cycling through the text) up to exactly `budget` tokens, the last one cut."""
        pieces, total, i = [], 0, 0
        while total < budget:
            ids = first if i == 0 and not start_spaced else spaced[i % len(spaced)]
            pieces.append(ids[:budget - total])
            total += len(pieces[-1])
            i += 1
        return pieces

    needle = encode(" " + needle_sentence(key))
    budget = length - len(head) - len(tail) - len(needle)
    if length - len(head) - len(tail) - max(len(needle), len(encode(needle_sentence(key)))) < 1:
        raise ValueError(f"length={length}: too short, the instruction, question and needle alone take "
                         f"{length - budget} tokens (at least {length - budget + 1})")
    pieces = fill(budget, start_spaced=False)
    bounds = [0]
    for ids in pieces:
        bounds.append(bounds[-1] + len(ids))
    at = min(range(len(bounds)), key=lambda k: (abs(bounds[k] - depth * budget), k))
    if at == 0:   # the needle opens the haystack: no leading space; the first sentence gets one instead
        needle = encode(needle_sentence(key))
        pieces = fill(length - len(head) - len(tail) - len(needle), start_spaced=True)
    ids = head + [t for p in pieces[:at] for t in p] + needle + [t for p in pieces[at:] for t in p] + tail
    assert len(ids) == length, (len(ids), length)
    return torch.tensor([ids], dtype=torch.long), key


def run_passkey(model, tokenizer, *, lengths: Sequence[int], depths: Sequence[float], trials: int,
                haystack: str | None, seed: int, max_new_tokens: int = 8, progress: bool = True,
                chat: bool = False, outputs: list | None = None) -> list[dict]:
    """Greedy passkey/needle retrieval over a grid of prompt lengths x needle depths.

    Each (length, depth) cell runs `trials` prompts (batch 1), each with its own key drawn from a
    generator seeded by (seed, length, depth, trial), so a cell's keys do not depend on the rest of the
    grid. A trial succeeds when the key appears in the decoded new tokens. `chat` picks the formulation
    (see `make_passkey_prompt`); the default, plain text, is the one that works best on
    SmolLM2-135M-Instruct: 4 trials x 5 depths, plain vs chat template, success 1.00 vs 0.95 at 512
    tokens, 0.95 vs 0.50 at 1024 (2 trials: 0.50 vs 0.10 at 2048).
    `outputs`, if a list, receives one {"length", "depth", "trial", "key", "text"} per trial.

    Returns one row per cell: {"length", "depth", "success" (fraction), "trials", "task"}, with task
    "passkey" (haystack=None, the filler) or "needle" (a haystack text).

    Raises ValueError for a length beyond the model's trained positions (without RoPE scaling), a
    depth outside [0, 1], trials < 1, an empty grid or max_new_tokens < 1.
    """
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if not lengths or not depths:
        raise ValueError(f"lengths={lengths} and depths={depths}: need at least one of each")
    if trials < 1:
        raise ValueError(f"trials={trials}: must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth}: must be in [0, 1] (0 = start of the haystack, 1 = its end)")
    for length in lengths:
        if length < 1:
            raise ValueError(f"length={length}: must be positive")
        check_length(model, length, "length")
    task = "passkey" if haystack is None else "needle"
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cells = [(length, depth) for length in lengths for depth in depths]
    bar = _progress(len(cells) * trials, progress, task)
    rows = []
    try:
        for length, depth in cells:
            hits = 0
            for trial in range(trials):
                key = make_key(random.Random(f"{seed}:{length}:{depth}:{trial}"))
                ids, answer = make_passkey_prompt(tokenizer, length, depth, key, haystack=haystack, chat=chat)
                ids = ids.to(device)
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, pad_token_id=pad)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                hits += answer in text
                if outputs is not None:
                    outputs.append({"length": length, "depth": depth, "trial": trial, "key": answer, "text": text})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"len {length} depth {depth:.2f}: {text.strip()!r}", refresh=False)
            rows.append({"length": length, "depth": depth, "success": hits / trials, "trials": trials, "task": task})
    finally:
        if bar is not None:
            bar.close()
    return rows


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="prompt")


def heatmap(rows: list[dict], path, title: str):
    """A depth x length heat map of success (0..1, annotated per cell) as one PNG; one panel per row "name"
    (rows without a name form one panel). Cells with several rows average them weighted by trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("heatmap: no rows")
    names = list(dict.fromkeys(row.get("name") for row in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.9 * len({r["length"] for r in rows}) * len(names) + 1.5,
                                                      1.5 + 0.5 * len({r["depth"] for r in rows})),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r.get("name") == name]
        lengths = sorted({r["length"] for r in mine})
        depths = sorted({r["depth"] for r in mine})
        hits = torch.zeros(len(depths), len(lengths), dtype=torch.float64)
        count = torch.zeros_like(hits)
        for r in mine:
            i, j = depths.index(r["depth"]), lengths.index(r["length"])
            weight = r.get("trials", 1)
            hits[i, j] += r["success"] * weight
            count[i, j] += weight
        grid = (hits / count).numpy()   # NaN where a cell has no row
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if count[i, j] > 0:
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if 0.25 < grid[i, j] < 0.85 else "white")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        if name is not None:
            ax.set_title(str(name))
    fig.colorbar(image, ax=axes[0].tolist(), label="success rate", shrink=0.9)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
