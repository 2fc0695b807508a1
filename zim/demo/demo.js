// The web chat of `zim-server --demo on`: a page of the server's WebSocket port, on the
// JavaScript client (/zim.js). It keeps its login (token) and the last seq it saw of each
// conversation in localStorage, so a reload logs in as the same user and the client fills
// what was sent meanwhile from history (its gap filling).
import { Client, channelKey, userKey } from "/zim.js";

const STORAGE = "zim-demo";
const PAGE = 30;                    // messages per history page
const $ = (id) => document.getElementById(id);

let client = null;
let saved = load();                 // {name, token, userId, lastSeqs, conversations: {key: title}, active}
const conversations = new Map();    // key -> {title, messages: Map(id -> message), unread, hasMore, loaded}

function load() {
  try {
    return JSON.parse(localStorage.getItem(STORAGE)) ?? {};
  } catch {
    return {};
  }
}

function save() {
  if (client) Object.assign(saved, { token: client.token, userId: client.userId, lastSeqs: client.lastSeqs });
  saved.conversations = Object.fromEntries([...conversations].map(([key, c]) => [key, c.title]));
  localStorage.setItem(STORAGE, JSON.stringify(saved));
}

function showError(where, error) {
  $(where).textContent = error ? String(error.message ?? error) : "";
}

// -- conversations ------------------------------------------------------------------------
function conversation(key, title) {
  let entry = conversations.get(key);
  if (!entry) {
    entry = { title: title ?? key.slice(key.indexOf(":") + 1), messages: new Map(), unread: 0, hasMore: false, loaded: false };
    conversations.set(key, entry);
    save();
    renderList();
  } else if (title && entry.title !== title && key.startsWith("user:")) {
    entry.title = title;
    renderList();
  }
  return entry;
}

function historyQuery(key) {
  const name = key.slice(key.indexOf(":") + 1);
  return key.startsWith("channel:") ? { channel: name } : { userId: name };
}

/** The newest page of a conversation (once), or the page before its oldest message. */
async function loadHistory(key, older = false) {
  const entry = conversation(key);
  const seqs = [...entry.messages.values()].map((message) => message.seq);
  const query = { ...historyQuery(key), limit: PAGE };
  if (older && seqs.length) query.beforeSeq = Math.min(...seqs);
  const page = await client.history(query);
  for (const message of page.messages) entry.messages.set(message.id, message);
  if (!older || !seqs.length) entry.loaded = true;
  entry.hasMore = page.hasMore;
  if (saved.active === key) renderMessages(older);
}

function open(key) {
  saved.active = key;
  const entry = conversation(key);
  entry.unread = 0;
  save();
  renderList();
  renderMessages();
  $("send-form").hidden = false;
  $("text").focus();
  if (!entry.loaded) loadHistory(key).catch((error) => showError("error", error));
}

function add(key, message, title) {
  const entry = conversation(key, title);
  if (entry.messages.has(message.id)) return;
  entry.messages.set(message.id, message);
  if ((saved.active === key && !document.hidden) || message.sender?.id === client.userId) renderMessages();
  else {
    entry.unread += 1;
    renderList();
    if (saved.active === key) renderMessages();
  }
}

// -- rendering ---------------------------------------------------------------------------
function renderList() {
  for (const [listId, prefix] of [["channels", "channel:"], ["dms", "user:"]]) {
    const list = $(listId);
    list.replaceChildren();
    for (const [key, entry] of conversations) {
      if (!key.startsWith(prefix)) continue;
      const item = document.createElement("li");
      item.dataset.key = key;
      item.className = [key === saved.active ? "active" : "", entry.unread ? "unread" : ""].join(" ").trim();
      const name = document.createElement("span");
      name.textContent = prefix === "channel:" ? `# ${entry.title}` : entry.title;
      item.append(name);
      if (entry.unread) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = String(entry.unread);
        item.append(badge);
      }
      item.addEventListener("click", () => open(key));
      list.append(item);
    }
  }
}

function renderMessages(keepTop = false) {
  const key = saved.active;
  const entry = key && conversations.get(key);
  if (!entry) return;
  const scroller = $("scroller");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  $("title").textContent = key.startsWith("channel:") ? `# ${entry.title}` : `${entry.title} (user ${key.slice(5)})`;
  $("older").hidden = !entry.hasMore;
  const items = [...entry.messages.values()].sort((a, b) => a.seq - b.seq).map((message) => {
    const item = document.createElement("li");
    item.dataset.seq = String(message.seq);
    if (message.sender?.id === client.userId) item.className = "mine";
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = message.sender?.name ?? "?";
    const time = document.createElement("time");
    time.textContent = new Date(message.createdAt).toLocaleTimeString();
    who.append(time);
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = typeof message.content === "string" ? message.content : JSON.stringify(message.content);
    item.append(who, text);
    return item;
  });
  $("messages").replaceChildren(...items);
  if (keepTop) scroller.scrollTop = scroller.scrollHeight - fromBottom;      // older ones above: stay put
  else scroller.scrollTop = scroller.scrollHeight;
}

function setStatus(state) {
  const status = $("status");
  status.textContent = state === "ready" ? "online" : state;
  status.className = `status ${state}`;
}

// -- the client ------------------------------------------------------------------------------
async function start(name) {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
  const options = { name, onState: setStatus, lastSeqs: saved.lastSeqs ?? {} };
  if (saved.token && saved.name === name) options.token = saved.token;
  client = new Client(url, options);
  await client.start();
  saved.name = name;
  for (const [key, title] of Object.entries(saved.conversations ?? {})) conversation(key, title);
  save();
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = name;
  $("me-id").textContent = client.userId;
  renderList();
  if (saved.active && conversations.has(saved.active)) open(saved.active);
  deliver();
}

async function deliver() {
  const me = client;
  try {
    for await (const push of me.pushes()) {
      if (!push.conversation) continue;
      const message = push.message;
      const title = push.conversation.startsWith("user:") && message.sender?.id !== me.userId
        ? message.sender?.name : undefined;
      add(push.conversation, message, title);
      save();
    }
  } catch (error) {
    if (me === client) {                // the token is no good any more: log in again
      showError("login-error", error);
      logout();
    }
  }
}

function logout() {
  client?.close();
  client = null;
  saved = {};
  localStorage.removeItem(STORAGE);
  conversations.clear();
  $("app").hidden = true;
  $("login").hidden = false;
}

// -- the forms -------------------------------------------------------------------------------
$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("login-error", null);
  try {
    await start($("login-name").value.trim());
  } catch (error) {
    client = null;
    showError("login-error", error);
  }
});

$("join-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("join-name").value.trim();
  try {
    await client.join(name);
    $("join-name").value = "";
    showError("error", null);
    open(channelKey(name));
  } catch (error) {
    showError("error", error);
  }
});

$("dm-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("dm-user").value.trim();
  $("dm-user").value = "";
  open(userKey(id));
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = saved.active;
  const content = $("text").value;
  if (!key || !content) return;
  const target = key.slice(key.indexOf(":") + 1);
  try {
    const sent = key.startsWith("channel:") ? await client.sendChannel(target, content) : await client.sendUser(target, content);
    $("text").value = "";
    showError("error", null);
    add(key, { id: sent.id, seq: sent.seq, content, sender: { id: client.userId, name: saved.name }, createdAt: Date.now() });
    save();
  } catch (error) {
    showError("error", error);
  }
});

$("older").addEventListener("click", () => loadHistory(saved.active, true).catch((error) => showError("error", error)));
$("scroller").addEventListener("scroll", () => {
  const entry = conversations.get(saved.active);
  if ($("scroller").scrollTop === 0 && entry?.hasMore) $("older").click();
});
$("logout").addEventListener("click", logout);
document.addEventListener("visibilitychange", () => {
  const entry = conversations.get(saved.active);
  if (!document.hidden && entry) {
    entry.unread = 0;
    renderList();
    renderMessages();
  }
});

if (saved.token && saved.name) {
  start(saved.name).catch((error) => {   // an expired or revoked token: log in anew
    showError("login-error", error);
    logout();
  });
} else {
  $("login").hidden = false;
}
