"""The chat web page served at `/` (plain HTML + JS, no build step).

It posts the conversation to /v1/chat/completions with `stream: true` and
appends the streamed deltas (server-sent events) to the reply as they come.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flashjax chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 0 auto; padding: 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem; min-height: 16rem; white-space: pre-wrap; }
  .msg { margin: .4rem 0; } .user { color: #024; } .assistant { color: #420; }
  .role { font-weight: bold; margin-right: .4rem; }
  form { display: flex; gap: .5rem; margin-top: .5rem; } #input { flex: 1; padding: .4rem; }
  #status { color: #666; font-size: .85rem; margin-top: .3rem; }
  label { font-size: .85rem; }
</style>
</head>
<body>
<h1>flashjax chat</h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="input" autocomplete="off" placeholder="Say something" autofocus>
  <label>max tokens <input id="max_tokens" type="number" value="64" min="1" style="width:4rem"></label>
  <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0" style="width:4rem"></label>
  <button id="send" type="submit">Send</button>
</form>
<div id="status">model: <span id="model">{{MODEL}}</span></div>
<script>
const log = document.getElementById("log");
const statusEl = document.getElementById("status");
const history = [];

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const r = document.createElement("span");
  r.className = "role"; r.textContent = role + ":";
  const t = document.createElement("span");
  t.className = "text"; t.textContent = text;
  div.append(r, t); log.append(div);
  return t;
}

async function send(text) {
  history.push({role: "user", content: text});
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.dataset.done = "0";
  const body = {
    model: document.getElementById("model").textContent, messages: history, stream: true,
    max_tokens: parseInt(document.getElementById("max_tokens").value || "64"),
    temperature: parseFloat(document.getElementById("temperature").value || "0.8"),
  };
  statusEl.textContent = "generating...";
  let reply = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({error: {message: resp.statusText}}));
      throw new Error(err.error ? err.error.message : resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices[0].delta || {};
          if (delta.content) { reply += delta.content; out.textContent = reply; }
        }
      }
    }
    history.push({role: "assistant", content: reply});
    statusEl.textContent = "done";
  } catch (e) {
    out.textContent = reply + " [error: " + e.message + "]";
    statusEl.textContent = "error";
  }
  out.parentElement.dataset.done = "1";
  document.body.dataset.replies = String((parseInt(document.body.dataset.replies || "0")) + 1);
}

document.getElementById("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send(text);
});

// For automated checks: /?q=hello&max_tokens=8 sends one message on load.
const urlParams = new URLSearchParams(location.search);
if (urlParams.get("max_tokens")) document.getElementById("max_tokens").value = urlParams.get("max_tokens");
const q = urlParams.get("q");
if (q) send(q);
</script>
</body>
</html>
"""
