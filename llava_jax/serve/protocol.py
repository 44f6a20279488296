"""The OpenAI chat-completions request: checked field by field, mapped onto the model's conversation template.

`parse_chat_request` turns the JSON body into a `ChatRequest` (or raises `RequestError`, which the app sends as
an OpenAI-style error with status 400): `messages` (roles system / user / assistant; content a string or a
list of `text` and `image_url` parts), `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`,
`seed`, `stop` (a string or up to 4 strings), `n` (1 only), `stream`, `stream_options.include_usage`.
Unknown fields are ignored, as OpenAI-compatible servers commonly do.

Messages become the template's turns: system messages replace the template's system text; consecutive
messages of one role are joined with a newline; the conversation must end with a user message. A user
message's images get `<image>` markers exactly as `generate` and `chat` put them (`with_image_markers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..prompt import render_prompt, with_image_markers
from ..validation import check_seed, check_stop, check_temperature, check_top_p

MAX_STOP_STRINGS = 4  # as OpenAI


class RequestError(InputError):
    """A request the server refuses; `status`, `param` and `code` go into the OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class ChatRequest:
    """A checked chat completion request."""

    model: str | None
    turns: list[str]  # alternating user / assistant texts, user first and last, with <image> markers
    system: str | None
    image_urls: list[str]  # in the order of the markers
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def prompt(self, template: str) -> str:
        return render_prompt(template, self.turns, system=self.system)


def _expect(body: dict, name: str, kinds, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise RequestError(f"'{name}' must be {what}, got {type(value).__name__} {_short(value)}", name,
                           "invalid_type")
    return value


def _as_tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sampling(check, name: str, value):
    try:
        return check(value)
    except InputError as e:
        raise RequestError(str(e), name, "invalid_value") from e


def _content(message: dict, index: int) -> tuple[str, list[str]]:
    """(text, image URLs) of one message's content."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts", where, "invalid_type")
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(f"'{at}' must be an object with a 'type'", at, "invalid_type")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"'{at}.text' must be a string", f"{at}.text", "invalid_type")
            texts.append(part["text"])
        elif part["type"] == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"'{at}.image_url.url' must be a non-empty string", f"{at}.image_url",
                                   "invalid_type")
            urls.append(url)
        else:
            raise RequestError(f"'{at}.type' {part['type']!r} is not supported (text, image_url)", f"{at}.type",
                               "invalid_value")
    return "\n".join(texts), urls


def _turns(messages) -> tuple[list[str], str | None, list[str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages", "invalid_type")
    system, turns, roles, urls = None, [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        text, images = _content(message, i)
        if role in ("system", "developer"):
            if images:
                raise RequestError("system messages cannot hold images", f"messages[{i}]", "invalid_value")
            system = text if system is None else system + "\n" + text
            continue
        if role not in ("user", "assistant"):
            raise RequestError(f"'messages[{i}].role' must be system, user or assistant, got {_short(role)}",
                               f"messages[{i}].role", "invalid_value")
        if role == "user" and not text and not images:
            raise RequestError(f"'messages[{i}]' is an empty user message", f"messages[{i}].content", "invalid_value")
        if role == "assistant" and images:
            raise RequestError("assistant messages cannot hold images", f"messages[{i}]", "invalid_value")
        text = with_image_markers(text, len(images)) if images else text
        urls += images
        if roles and roles[-1] == role:
            turns[-1] += "\n" + text
        else:
            turns.append(text)
            roles.append(role)
    if not roles or roles[0] != "user":
        raise RequestError("the conversation must start with a user message (after any system message)", "messages",
                           "invalid_value")
    if roles[-1] != "user":
        raise RequestError("the last message must be a user message", "messages", "invalid_value")
    return turns, system, urls


def parse_chat_request(body) -> ChatRequest:
    """A checked `ChatRequest` from the decoded JSON body; `RequestError` names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_type")
    model = _expect(body, "model", str, "a string")
    turns, system, urls = _turns(body.get("messages"))
    n = _expect(body, "n", int, "an integer", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {n}", "n", "invalid_value")
    max_tokens = _expect(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _expect(body, "max_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens", "invalid_value")
    temperature = _expect(body, "temperature", (int, float), "a number", 1.0)
    temperature = _sampling(check_temperature, "temperature", temperature)
    if temperature > 2:
        raise RequestError(f"'temperature' must be at most 2, got {temperature}", "temperature", "invalid_value")
    top_p = _expect(body, "top_p", (int, float), "a number")
    top_p = _sampling(check_top_p, "top_p", top_p)
    seed = _expect(body, "seed", int, "an integer")
    if seed is not None:
        seed = _sampling(check_seed, "seed", seed)
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, str | list):
            raise RequestError(f"'stop' must be a string or a list of strings, got {_short(stop)}", "stop",
                               "invalid_type")
        stop = _sampling(check_stop, "stop", stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop",
                               "invalid_value")
    stream = _expect(body, "stream", bool, "a boolean", False)
    options = _expect(body, "stream_options", dict, "an object", {})
    include_usage = _expect(options, "include_usage", bool, "a boolean", False)
    return ChatRequest(model=model, turns=turns, system=system, image_urls=urls, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, seed=seed, stop=stop or [], stream=stream,
                       include_usage=include_usage)
