"""A chat client running a local transformers causal LM (default: the offline SmolLM2-135M-Instruct).

Prompts go through the tokenizer's own chat template. Requests are generated in batches (left-padded, sorted by
length so padding stays small); a scorer's one-token yes/no question then costs one forward pass. Decoding is
greedy at temperature 0 and sampled otherwise. The first token's top alternatives come from its logits, in the same
form an OpenAI endpoint returns, so scorers get probabilities (and AUC) from either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saelab.errors import ConfigError
from saelab.interp.llm import ChatClient, ChatReply, ChatRequest, OnReply, merge_logprobs


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
        order = sorted(range(len(requests)), key=lambda i: (requests[i].temperature, len(prompts[i])))
        replies: list[ChatReply | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            temperature = requests[order[start]].temperature
            batch = [i for i in order[start : start + self.batch_size] if requests[i].temperature == temperature]
            start += len(batch)
            for index, reply in zip(batch, self._generate([requests[i] for i in batch], [prompts[i] for i in batch]),
                                    strict=True):
                replies[index] = reply
                if on_reply is not None:
                    on_reply(index, reply)
        return [reply for reply in replies if reply is not None]

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        replies = []
        for row, (request, prompt) in enumerate(zip(requests, prompts, strict=True)):
            generated = out.sequences[row, width:].tolist()[: request.max_tokens]
            ends = [i for i, token in enumerate(generated) if token in self._stop]
            generated = generated[: ends[0] + 1] if ends else generated
            alternatives = None
            if request.top_logprobs:
                values, ids = first_logprobs[row].topk(request.top_logprobs)
                tokens = self.tokenizer.batch_decode([[i] for i in ids.tolist()])
                alternatives = merge_logprobs(list(zip(tokens, values.tolist(), strict=True)))
            replies.append(ChatReply(
                text=self.tokenizer.decode(generated, skip_special_tokens=True),
                prompt_tokens=len(prompt),
                completion_tokens=len(generated),
                first_token_logprobs=alternatives,
            ))
        return replies
