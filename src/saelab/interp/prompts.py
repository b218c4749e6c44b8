"""Prompts for the explainer and the scorers, and the parsing of their replies.

Parsers never raise: a reply that cannot be read yields None, and callers count it as invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from saelab.interp.llm import ChatRequest

EXPLAINER_SYSTEM = (
    "You are an interpretability researcher explaining a latent (a feature) of a neural network that reads text. "
    "You are shown text excerpts in which the latent activates. Tokens where it activates are marked <<like this>>, "
    "and after each excerpt the marked tokens are listed with the activation strength from 1 to 10. "
    "Find what the marked tokens, and the text around them, have in common. Be concise: a short phrase is best. "
    "Answer with one line of the form\nExplanation: <your explanation>"
)

DETECTION_SYSTEM = (
    "You are testing an explanation of a latent (a feature) of a neural network that reads text. You are given the "
    "explanation and one text excerpt. Answer Yes if the latent would activate on some token of the excerpt, "
    "otherwise No. Answer with one word: Yes or No."
)

FUZZING_SYSTEM = (
    "You are testing an explanation of a latent (a feature) of a neural network that reads text. You are given the "
    "explanation and one text excerpt in which some tokens are marked <<like this>>. Answer Yes if the marked tokens "
    "are the ones the explanation describes, otherwise No. Answer with one word: Yes or No."
)

_EXPLANATION = re.compile(r"explanation\s*:\s*(.+)", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def explainer_request(excerpts: Sequence[tuple[str, Sequence[tuple[str, int]]]], max_tokens: int) -> ChatRequest:
    """`excerpts`: (marked text, [(activating token text, 1-10 strength)]) pairs."""
    blocks = []
    for number, (text, activating) in enumerate(excerpts, start=1):
        listed = ", ".join(f"{token.strip()!r} ({strength})" for token, strength in activating)
        blocks.append(f"Excerpt {number}: {text}\nActivating tokens: {listed}")
    user = "\n\n".join(blocks) + "\n\nWhat does the latent detect?"
    return ChatRequest((("system", EXPLAINER_SYSTEM), ("user", user)), max_tokens=max_tokens)


def parse_explanation(reply: str) -> str | None:
    """The first sentence after the last "Explanation:", else of the first non-empty line (small models ignore the
    format and ramble on); None for an empty reply."""
    matches = _EXPLANATION.findall(reply)
    candidate = matches[-1] if matches else next((line for line in reply.splitlines() if line.strip()), "")
    candidate = _SENTENCE_END.split(candidate.strip(), maxsplit=1)[0]
    candidate = candidate.strip().strip("\"'`*").strip()
    return candidate or None


def yes_no_request(system: str, explanation: str, excerpt: str, top_logprobs: int) -> ChatRequest:
    user = f"Explanation: {explanation}\nExcerpt: {excerpt}\nAnswer Yes or No."
    return ChatRequest((("system", system), ("user", user)), max_tokens=1, top_logprobs=top_logprobs)


def parse_yes_no(reply: str) -> bool | None:
    """True for yes, False for no (the first word, any case), None otherwise."""
    match = _FIRST_WORD.search(reply)
    word = match.group(0).lower() if match else ""
    return {"yes": True, "no": False}.get(word)


def yes_probability(logprobs: dict[str, float] | None) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's alternatives; None if neither answer is among them."""
    if not logprobs:
        return None
    totals = {True: 0.0, False: 0.0}
    for token, logprob in logprobs.items():
        answer = parse_yes_no(token) if token.strip().isalpha() else None
        if answer is not None:
            totals[answer] += math.exp(logprob)
    total = totals[True] + totals[False]
    return totals[True] / total if total > 0 else None
