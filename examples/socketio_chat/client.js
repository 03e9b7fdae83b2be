// A terminal chat client on Socket.IO, for wsrouter's demo: the real
// `socket.io-client` with its default transports (long-polling, then
// WebSocket). Lines you type are said to the room.
//
//   node client.js http://127.0.0.1:8080 --session alice --room demo
"use strict";
const readline = require("readline");
const { io } = require("socket.io-client");

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
const url = args[0] || "http://127.0.0.1:8080";
const session = option("--session", `visitor-${Math.floor(Math.random() * 1e6)}`);
const room = option("--room", "lobby");

const socket = io(url, { query: { session }, auth: { room, name: session } });
socket.on("connect", () => console.log(`* connected (${socket.io.engine.transport.name})`));
socket.io.on("open", () => socket.io.engine.on("upgrade", (t) => console.log(`* upgraded to ${t.name}`)));
socket.on("disconnect", (reason) => console.log(`* disconnected: ${reason}`));
socket.on("system", (m) => console.log(`* ${m.text}`));
socket.on("said", (m) => console.log(`${m.name}@${m.backend}: ${m.text}`));

readline.createInterface({ input: process.stdin }).on("line", (text) => {
  socket.emit("say", text, (ack) => console.log(`  (delivered by ${ack.backend})`));
});
