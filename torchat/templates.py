"""Chat formats: a conversation (a list of {"role", "content"} messages) -> prompt token ids.

One registry entry per format. `jinja` renders the template a GGUF or tokenizer_config.json carries (ChatML for
SmolLM2), as transformers' apply_chat_template does; `llama2` and `llama3` are Meta's formats, written out
because their sentencepiece/tiktoken files carry no template. `pick_template` chooses from the tokenizer.
"""

from collections.abc import Callable

from torchat.errors import TorchatError, unknown_key_error

Message = dict[str, str]


def _check_roles(messages: list[Message]) -> None:
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant"):
            raise TorchatError(f"chat message role {message.get('role')!r}; use system, user or assistant")


def render_jinja(tokenizer, messages: list[Message], add_generation_prompt: bool = True,
                 template: str | None = None) -> list[int]:
    """The tokenizer's own Jinja template, rendered like transformers' apply_chat_template, then encoded
    with its special tokens recognised."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = template or tokenizer.chat_template
    if template is None:
        raise TorchatError(f"{tokenizer.path}: the tokenizer carries no chat template; pass --chat-template "
                           f"(one of: {', '.join(sorted(TEMPLATES))})")
    specials = {v: k for k, v in tokenizer.special_tokens.items()}

    def raise_exception(message):
        raise TorchatError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=specials.get(tokenizer.bos_id, ""), eos_token=specials.get(tokenizer.eos_id, ""))
    except jinja2.TemplateError as error:
        raise TorchatError(f"{tokenizer.path}: its chat template does not render ({error})") from None
    return tokenizer.encode(text, allow_special=True)


def render_llama3(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """<|begin_of_text|> then per message <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>."""
    _check_roles(messages)
    special = tokenizer.special_tokens

    def header(role: str) -> list[int]:
        return [special["<|start_header_id|>"], *tokenizer.encode(role), special["<|end_header_id|>"],
                *tokenizer.encode("\n\n")]

    ids = [special["<|begin_of_text|>"]]
    for message in messages:
        ids += header(message["role"]) + tokenizer.encode(message["content"].strip()) + [special["<|eot_id|>"]]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def render_llama2(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Meta's Llama-2 chat: <s>[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nUSER [/INST] ANSWER </s> per turn."""
    _check_roles(messages)
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"].strip(), messages[1:]
        if rest:
            rest = [{"role": rest[0]["role"],
                     "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{rest[0]['content'].strip()}"}, *rest[1:]]
    else:
        rest = messages
    ids: list[int] = []
    for i in range(0, len(rest), 2):
        user = rest[i]
        answer = rest[i + 1] if i + 1 < len(rest) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise TorchatError("llama2 chat needs turns that alternate user, assistant (after one system message)")
        if answer is not None:
            ids += tokenizer.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ",
                                    bos=True, eos=True)
        elif add_generation_prompt:
            ids += tokenizer.encode(f"[INST] {user['content'].strip()} [/INST]", bos=True)
    return ids


TEMPLATES: dict[str, Callable[..., list[int]]] = {
    "jinja": render_jinja,
    "llama3": render_llama3,
    "llama2": render_llama2,
}


def pick_template(tokenizer, name: str | None = None) -> str:
    """The format named, else the tokenizer's own Jinja template, else Meta's format for its kind."""
    if name is not None:
        if name not in TEMPLATES:
            raise unknown_key_error("chat template", name, TEMPLATES)
        return name
    if tokenizer.chat_template:
        return "jinja"
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return "llama3"
    return "llama2"


def render(tokenizer, template: str, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    return TEMPLATES[template](tokenizer, messages, add_generation_prompt)
