// The chat page: talks only to this server's OpenAI-compatible API (same origin), streams replies as server-sent
// events read from fetch(), keeps the conversation in memory and sends all of it with every message.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];        // the conversation sent with each request: {role, content}
let controller = null;   // aborts the reply being streamed (Stop, New chat)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function errorText(status, body) {
  const e = (body && body.error) || {};
  const hint = status === 401 ? " (enter the server's API key above)" : "";
  return `error ${status}${e.code ? " " + e.code : ""}: ${e.message || "no details"}${hint}`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  div.appendChild(content);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModels() {
  try {
    const [r, health] = await Promise.all([fetch("/v1/models", { headers: headers() }),
                                           fetch("/health", { headers: headers() })]);
    const body = await r.json();
    if (!r.ok) return showError(errorText(r.status, body));
    const preferred = health.ok ? (await health.json()).default_model : null;
    const select = $("model");
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id, false, m.id === preferred)));
    showError("");
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
}

// One server-sent event stream: calls onChunk(parsed JSON) per `data:` line until `data: [DONE]`.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        onChunk(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function send(text) {
  showError("");
  const convo = history;  // New chat during the reply starts another array; this reply stays with its own
  convo.push({ role: "user", content: text });
  const userDiv = addMessage("user", text);
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(convo);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "", finish = null, failed = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("model").value, messages, stream: true,
                             temperature: Number($("temperature").value),
                             max_tokens: Number($("max-tokens").value) }),
    });
    if (!r.ok) throw new Error(errorText(r.status, await r.json().catch(() => null)));
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(errorText(500, chunk));
      const choice = chunk.choices[0];
      if (choice.delta.content) {
        reply += choice.delta.content;
        bubble.firstChild.textContent = reply;
        $("log").scrollTop = $("log").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { failed = true; showError(e.message); }
  } finally {
    controller = null;
    bubble.classList.remove("streaming");
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (failed && !reply) {  // nothing came back: the message is not part of the conversation
    convo.pop();
    bubble.remove();
    userDiv.classList.add("failed");
    return;
  }
  convo.push({ role: "assistant", content: reply });
  const notes = { length: "cut at max tokens", stopped: "stopped" };
  if (notes[finish]) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = `(${notes[finish]})`;
    bubble.appendChild(note);
  }
  bubble.dataset.finish = finish || "error";  // for scripts and tests: the reply is complete
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("log").replaceChildren();
  showError("");
});
$("api-key").addEventListener("change", loadModels);
loadModels();
