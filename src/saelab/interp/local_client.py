"""A chat client running a local transformers causal LM (default: the offline SmolLM2-135M-Instruct).

Prompts go through the tokenizer's own chat template and are answered in batches. One-token requests (the scorers'
yes/no questions) need no generation loop: a batch is sorted so that prompts sharing a prefix (system prompt and
explanation) sit together, the shared prefix runs once, and only each prompt's own tail (the excerpt) runs on top
of it, which makes scoring several times cheaper. Longer requests are generated left-padded, greedily at
temperature 0 and sampled otherwise. The first token's top alternatives come from its logits, in the form an
OpenAI endpoint returns, so scorers get probabilities (and AUC) from either.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.interp.llm import ChatClient, ChatReply, ChatRequest, OnReply, merge_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LocalChatClient(ChatClient):
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, batch_size: int = 8
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {name!r} has no chat template; use an instruction-tuned model "
                "(e.g. the offline default smollm2-135m) or an OpenAI-compatible server"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = f"local:{name}"
        self.batch_size = batch_size
        eos = tokenizer.eos_token_id
        self._stop = {eos} if eos is not None else set()
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)

    def complete(self, request: ChatRequest) -> ChatReply:
        return self.complete_many([request])[0]

    def complete_many(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[ChatReply]:
        prompts = [self._prompt_ids(request) for request in requests]
        one_token = sorted((i for i, r in enumerate(requests) if r.max_tokens == 1),
                           key=lambda i: (requests[i].temperature, prompts[i]))
        longer = sorted((i for i, r in enumerate(requests) if r.max_tokens > 1),
                        key=lambda i: (requests[i].temperature, len(prompts[i])))
        replies: list[ChatReply | None] = [None] * len(requests)
        for order, answer in ((one_token, self._next_token), (longer, self._generate)):
            for _, same in itertools.groupby(order, key=lambda i: requests[i].temperature):
                group = list(same)
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    answered = answer([requests[i] for i in batch], [prompts[i] for i in batch])
                    for index, reply in zip(batch, answered, strict=True):
                        replies[index] = reply
                        if on_reply is not None:
                            on_reply(index, reply)
        return [reply for reply in replies if reply is not None]

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _next_token(self, requests: list[ChatRequest], prompts: list[list[int]]) -> list[ChatReply]:
        """One token per prompt: the shared prefix once (its cache repeated per row), then the tails, padded on the
        left (masked, positions continuing the prefix) so every row ends at the last position and only that
        position goes through the unembedding."""
        shared = _common_prefix(prompts, limit=min(len(p) for p in prompts) - 1)
        device = self.model.device
        past = None
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], device=device)
            past = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            past.batch_repeat_interleave(len(prompts))
        tails = [p[shared:] for p in prompts]
        width = max(len(t) for t in tails)
        input_ids = torch.tensor([[self._pad] * (width - len(t)) + t for t in tails], device=device)
        tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
        attention_mask = torch.cat([torch.ones(len(tails), shared, dtype=tail_mask.dtype, device=device), tail_mask], 1)
        positions = (shared + (tail_mask.cumsum(1) - 1).clamp_min(0)).to(torch.long)
        last = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          past_key_values=past, use_cache=past is not None, logits_to_keep=1).logits[:, -1]
        if requests[0].temperature > 0:
            probabilities = torch.softmax(last.float() / requests[0].temperature, dim=-1)
            chosen = torch.multinomial(probabilities, 1).squeeze(1).tolist()
        else:
            chosen = last.argmax(dim=-1).tolist()
        first_logprobs = torch.log_softmax(last.float(), dim=-1)
        return [self._reply(request, prompt, [token], first_logprobs[row])
                for row, (request, prompt, token) in enumerate(zip(requests, prompts, chosen, strict=True))]

    @torch.inference_mode()
    def _generate(self, requests: list[ChatRequest], prompts: list[list[int]]) -> list[ChatReply]:
        width = max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        temperature = requests[0].temperature
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max(r.max_tokens for r in requests),
            pad_token_id=self._pad,
            output_logits=True,
            return_dict_in_generate=True,
            top_p=None,
            top_k=None,
            **sampling,
        )
        first_logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
        return [self._reply(request, prompt, out.sequences[row, width:].tolist(), first_logprobs[row])
                for row, (request, prompt) in enumerate(zip(requests, prompts, strict=True))]

    def _reply(
        self, request: ChatRequest, prompt: list[int], generated: list[int], first_logprobs: Tensor
    ) -> ChatReply:
        """The reply up to and including the first stop token (at most `max_tokens`), with the first token's top
        alternatives when asked for."""
        generated = generated[: request.max_tokens]
        ends = [i for i, token in enumerate(generated) if token in self._stop]
        generated = generated[: ends[0] + 1] if ends else generated
        alternatives = None
        if request.top_logprobs:
            values, ids = first_logprobs.topk(request.top_logprobs)
            tokens = self.tokenizer.batch_decode([[i] for i in ids.tolist()])
            alternatives = merge_logprobs(list(zip(tokens, values.tolist(), strict=True)))
        return ChatReply(
            text=self.tokenizer.decode(generated, skip_special_tokens=True),
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            first_token_logprobs=alternatives,
        )


def _common_prefix(sequences: list[list[int]], limit: int) -> int:
    """Length of the longest prefix all `sequences` share, at most `limit`."""
    length = 0
    while length < limit and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length
