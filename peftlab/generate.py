"""Text from a trained causal-LM adapter: a conversation rendered by the tokenizer's chat template,
answered by greedy (or sampled) decoding, streamed as it is produced."""
from __future__ import annotations

import torch
from torch import nn


def reply(model: nn.Module, tokenizer, history: list[dict[str, str]], max_new_tokens: int = 256,
          temperature: float = 0.0, stream: bool = True) -> str:
    """Answer the conversation `history` (OpenAI-style messages ending with a user turn) and append
    the answer to it. temperature 0 is greedy decoding, the same tokens every time."""
    from transformers import TextStreamer

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:  # plain text, as training joined turns without a template
        ids = tokenizer("\n".join(m["content"] for m in history), return_tensors="pt")["input_ids"]
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    model.eval()
    with torch.no_grad():
        out = model.generate(ids.to(next(model.parameters()).device), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    history.append({"role": "assistant", "content": answer})
    return answer


def converse(model: nn.Module, tokenizer, prompt: str | None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0) -> None:
    """Answer `prompt`, or (prompt None) hold a conversation on the terminal until an empty line."""
    history = [{"role": "system", "content": system}] if system else []
    if prompt is None:
        print("peftlab: interactive; an empty line or Ctrl-D ends the conversation")
    while True:
        try:
            text = prompt if prompt is not None else input("> ").strip()
        except EOFError:
            return
        if not text:
            return
        history.append({"role": "user", "content": text})
        reply(model, tokenizer, history, max_new_tokens, temperature)
        if prompt is not None:
            return
