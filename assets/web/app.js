// voxloop's browser client: the xiaozhi device protocol (version 1: raw Opus frames) over a
// WebSocket to `voxloop serve`'s device server, with the microphone encoded and the reply
// decoded by WebCodecs' Opus AudioEncoder and AudioDecoder. docs/ARCHITECTURE.md §5 has the
// protocol; `features.tool_events` in the hello asks the server for each tool call.
"use strict";

const SPEECH_RATE = 16000; // Hz: what the server's VAD and ASR take (ARCHITECTURE §5)
const FRAME_MS = 60; // uplink Opus frame length, as a xiaozhi device sends
const $ = (id) => document.getElementById(id);

// What a test (or a curious user) can read: frames in and out, bytes in, the state.
const stats = { framesIn: 0, framesOut: 0, bytesIn: 0, framesDecoded: 0, state: "signed out",
  captureStartMs: null, sttMs: null, firstAudioMs: null, lastFrameMs: null };
window.voxloopStats = stats;

let config = null; // {device_port, device_path}
let token = "";
let socket = null;
let wanted = false; // the user pressed Talk and has not left
let listening = false;
let speaking = false; // between tts start and tts stop
let reconnectDelay = 500;
let capture = null; // {context, stream, node, encoder}
let playback = null; // {context, gain, decoder, next, sources}

function setState(state) {
  stats.state = state;
  $("state").textContent = state;
}

function say(text) {
  $("message").textContent = text || "";
}

function item(list, text, className) {
  const li = document.createElement("li");
  li.textContent = text;
  if (className) li.className = className;
  $(list).appendChild(li);
}

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The status panel: the API's status (servers, breakers, sessions) and readiness (models).
async function refreshStatus() {
  try {
    const response = await fetch("/v1/mcp/status", { headers: authHeaders() });
    if (response.status === 401 || response.status === 403) {
      $("signin").hidden = false;
      setState("signed out");
      say(`The token or key was not accepted (${response.status}): sign in with a valid one.`);
      return false;
    }
    const status = await response.json();
    const ready = await fetch("/ready").then((r) => r.json()).catch(() => null);
    const lines = [];
    for (const server of status.servers || []) {
      lines.push(`MCP ${server.name}: ${server.tools} tools, breaker ${server.breaker}` +
        (server.startup_error ? `, failed: ${server.startup_error}` : ""));
    }
    for (const b of status.breakers || []) lines.push(`breaker ${b.upstream}: ${b.state}`);
    lines.push(`sessions: ${JSON.stringify(status.sessions)}`);
    for (const check of (ready && ready.checks) || []) {
      if (String(check.check).startsWith("model:")) {
        lines.push(`${check.check}: ${check.ok ? "present" : "missing"}`);
      }
    }
    $("status").textContent = lines.join("\n");
    return true;
  } catch (e) {
    $("status").textContent = `status unavailable: ${e}`;
    return true;
  }
}

function deviceUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const params = new URLSearchParams({
    "device-id": sessionStorage.getItem("voxloop-device") || "browser",
    "client-id": sessionStorage.getItem("voxloop-client") || "browser",
    "protocol-version": "1",
  });
  if (token) params.set("access_token", token);
  return `${scheme}://${location.hostname}:${config.device_port}${config.device_path}?${params}`;
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function connect() {
  setState(stats.state === "reconnecting" ? "reconnecting" : "connecting");
  const ws = new WebSocket(deviceUrl());
  ws.binaryType = "arraybuffer";
  socket = ws;
  ws.onopen = () => {
    send({ type: "hello", version: 1, transport: "websocket",
      features: { mcp: false, aec: $("realtime").checked, tool_events: true },
      audio_params: { format: "opus", sample_rate: SPEECH_RATE, channels: 1, frame_duration: FRAME_MS } });
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onText(JSON.parse(event.data));
    else onAudio(event.data);
  };
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    listening = false;
    if (!wanted) {
      setState("idle");
      return;
    }
    // The server went away mid-talk (a restart, a network drop): try again, backing off.
    setState("reconnecting");
    if (event.reason) say(`connection closed: ${event.reason}`);
    setTimeout(() => { if (wanted && !socket) connect(); }, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 5000);
  };
}

function listen() {
  const mode = $("realtime").checked ? "realtime" : "auto";
  send({ type: "listen", state: "start", mode });
  listening = true;
  setState("listening");
}

function onText(message) {
  switch (message.type) {
    case "hello":
      reconnectDelay = 500;
      say("");
      startPlayback(message.audio_params.sample_rate);
      if (wanted) listen();
      break;
    case "stt":
      stats.sttMs = performance.now();
      item("heard", message.text);
      break;
    case "tts":
      if (message.state === "start") {
        speaking = true;
        setState("speaking");
      } else if (message.state === "sentence_start" && message.text) {
        item("reply", message.text);
      } else if (message.state === "stop") {
        speaking = false;
        if (wanted) listen();
      }
      break;
    case "tool": {
      const args = JSON.stringify(message.arguments);
      const outcome = message.is_error ? "failed" : "ok";
      item("tools", `${message.name}(${args}) [${message.server}, ${outcome}]: ${message.result}`,
        message.is_error ? "error" : "");
      break;
    }
    case "alert":
      say(`${message.status}: ${message.message}`);
      break;
    default:
      break;
  }
}

// Downlink: each binary frame is one Opus packet at the rate the server's hello named.
function startPlayback(rate) {
  if (playback && playback.rate === rate) return;
  if (typeof AudioDecoder === "undefined") {
    say("This browser has no WebCodecs AudioDecoder: replies cannot be played.");
    return;
  }
  const context = playback ? playback.context : new AudioContext();
  const gain = playback ? playback.gain : context.createGain();
  if (!playback) gain.connect(context.destination);
  gain.gain.value = Number($("volume").value) / 100;
  const state = { context, gain, rate, next: 0, sources: new Set(), decoder: null };
  state.decoder = new AudioDecoder({
    output: (data) => schedule(state, data),
    error: (e) => say(`audio decoder: ${e.message}`),
  });
  state.decoder.configure({ codec: "opus", sampleRate: rate, numberOfChannels: 1 });
  playback = state;
}

function schedule(state, data) {
  const frames = data.numberOfFrames;
  const samples = new Float32Array(frames);
  data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
  const rate = data.sampleRate;
  data.close();
  stats.framesDecoded += 1;
  const buffer = state.context.createBuffer(1, frames, rate);
  buffer.copyToChannel(samples, 0);
  const source = state.context.createBufferSource();
  source.buffer = buffer;
  source.connect(state.gain);
  const now = state.context.currentTime;
  const at = Math.max(now + 0.03, state.next);
  source.start(at);
  state.next = at + buffer.duration;
  state.sources.add(source);
  source.onended = () => state.sources.delete(source);
  if (stats.firstAudioMs === null) stats.firstAudioMs = performance.now() + (at - now) * 1000;
}

let timestamp = 0;
function onAudio(buffer) {
  stats.framesIn += 1;
  stats.bytesIn += buffer.byteLength;
  stats.lastFrameMs = performance.now();
  if (!playback || playback.decoder.state !== "configured") return;
  playback.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: buffer }));
  timestamp += FRAME_MS * 1000;
}

// Uplink: the microphone at 16 kHz, 60 ms frames, Opus.
async function startCapture() {
  if (capture) return;
  if (typeof AudioEncoder === "undefined") {
    throw new Error("This browser has no WebCodecs AudioEncoder: it cannot send speech.");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const context = new AudioContext({ sampleRate: SPEECH_RATE });
  // The worklet's code is in the page (one response, so a link with ?access_token= is enough).
  const code = document.getElementById("capture-js").textContent;
  const url = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
  await context.audioWorklet.addModule(url);
  URL.revokeObjectURL(url);
  const node = new AudioWorkletNode(context, "voxloop-capture", {
    processorOptions: { frameSamples: (SPEECH_RATE * FRAME_MS) / 1000 },
  });
  const encoder = new AudioEncoder({
    output: (chunk) => {
      // In auto mode the device is quiet while the reply plays, as the firmware is.
      if (!listening || (speaking && !$("realtime").checked)) return;
      if (!socket || socket.readyState !== WebSocket.OPEN) return;
      const packet = new ArrayBuffer(chunk.byteLength);
      chunk.copyTo(packet);
      socket.send(packet);
      stats.framesOut += 1;
    },
    error: (e) => say(`audio encoder: ${e.message}`),
  });
  encoder.configure({ codec: "opus", sampleRate: SPEECH_RATE, numberOfChannels: 1, bitrate: 24000,
    opus: { frameDuration: FRAME_MS * 1000 } });
  let at = 0;
  node.port.onmessage = (event) => {
    if (stats.captureStartMs === null) stats.captureStartMs = performance.now();
    const samples = event.data;
    const data = new AudioData({ format: "f32-planar", sampleRate: SPEECH_RATE, numberOfFrames: samples.length,
      numberOfChannels: 1, timestamp: at, data: samples });
    at += FRAME_MS * 1000;
    encoder.encode(data);
    data.close();
  };
  context.createMediaStreamSource(stream).connect(node);
  capture = { context, stream, node, encoder };
}

async function talk() {
  say("");
  wanted = true;
  try {
    await startCapture();
  } catch (e) {
    wanted = false;
    say(`${e.message || e}`);
    return;
  }
  if (playback) playback.context.resume();
  if (!socket) connect();
  else if (socket.readyState === WebSocket.OPEN) listen();
}

// Stop: the reply ends now (`abort`; what was already scheduled is cut off too), and the page
// stops sending speech until Talk is pressed again. It sends no `listen stop`: that would make
// the speech heard so far a request.
function stop() {
  wanted = false;
  listening = false;
  send({ type: "abort", reason: "user" });
  if (socket) setState("idle");
  if (playback) {
    for (const source of playback.sources) {
      try { source.stop(); } catch (_) { /* already ended */ }
    }
    playback.sources.clear();
    playback.next = 0;
  }
}

async function start() {
  const query = new URLSearchParams(location.search);
  if (query.get("access_token")) {
    sessionStorage.setItem("voxloop-token", query.get("access_token"));
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem("voxloop-token") || "";
  if (!sessionStorage.getItem("voxloop-client")) {
    const id = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
    sessionStorage.setItem("voxloop-client", id);
    sessionStorage.setItem("voxloop-device", `browser-${id.slice(0, 8)}`);
  }
  config = await fetch("/web/config.json", { headers: authHeaders() }).then((r) => r.json());
  $("talk").onclick = talk;
  $("stop").onclick = stop;
  $("volume").oninput = () => { if (playback) playback.gain.gain.value = Number($("volume").value) / 100; };
  $("signin").onsubmit = async (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("voxloop-token", token);
    if (await refreshStatus()) {
      $("signin").hidden = true;
      say("");
      setState("idle");
    }
  };
  if (await refreshStatus()) setState("idle");
  setInterval(() => { if (!$("signin").hidden) return; refreshStatus(); }, 5000);
}

start();
