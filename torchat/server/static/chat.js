// The chat page: keeps the conversation, streams each answer from /v1/chat/completions (server-sent events read
// with fetch and a ReadableStream), and stops an answer with an AbortController. No libraries, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} for every finished turn
let model = null;
let controller = null;   // the answer being streamed, if any

for (const id of ["system", "max-tokens", "temperature", "api-key"]) {
  const saved = localStorage.getItem(`torchat.${id}`);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem(`torchat.${id}`, $(id).value));
}

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function show(role, text, className = "") {
  const div = document.createElement("div");
  div.className = `message ${role} ${className}`.trim();
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    model = body.data[0].id;
    $("model").textContent = `${model} · ${body.data[0].max_model_len}-token context`;
  } catch (error) {
    $("model").textContent = `cannot reach the server: ${error.message}`;
  }
}

// Yields the parsed JSON of each `data:` event of a server-sent event stream, until [DONE].
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function busy(streaming) {
  $("send").disabled = streaming;
  $("stop").disabled = !streaming;
}

async function send(text) {
  if (model === null) await loadModel();
  conversation.push({ role: "user", content: text });
  show("user", text);
  const answer = show("assistant", "");
  answer.dataset.state = "streaming";
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation];
  controller = new AbortController();
  busy(true);
  let content = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true },
                             max_tokens: Number($("max-tokens").value) || undefined,
                             temperature: Number($("temperature").value) }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
    }
    answer.dataset.reused = response.headers.get("x-torchat-prefix-reused") || "0";
    for await (const chunk of events(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        content += choice.delta.content;
        answer.textContent = content;
        answer.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) answer.title = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} answer tokens`;
    }
    answer.dataset.finish = finish || "";
    if (finish === "length") show("note", "[the answer reached max tokens]", "note");
  } catch (error) {
    if (error.name === "AbortError") {
      answer.dataset.finish = "stopped";
      show("note", "[stopped]", "note");
    } else {
      answer.classList.add("error");
      answer.dataset.finish = "error";
      answer.textContent = content ? `${content}\n[error: ${error.message}]` : `error: ${error.message}`;
    }
  } finally {
    // what was said stays in the conversation, a stopped answer included
    if (content) conversation.push({ role: "assistant", content });
    else conversation.pop();  // nothing was answered: the question goes too
    answer.dataset.state = "done";
    controller = null;
    busy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
});
loadModel();
