// A Socket.IO 4.8 chat server for wsrouter's tests: the real `socket.io`
// package, on a loopback port.
//
//   node server.js --id NAME [--port 0] [--ping-interval MS] [--refuse-moved]
//
// Prints one line `listening PORT` when it accepts connections, then one
// JSON line per event a test may want to see (a connection with the headers
// it came with, each event received). Answers:
//   - `echo` (with an acknowledgement): {backend, data}
//   - `join` room: joins it, acknowledges {backend, room}
//   - `blob` (label, binary attachment): acknowledges {backend, label, bytes, fill}
// On each connection it emits `welcome` {backend, sid, migratedFrom} and
// joins the room named in the auth payload (`auth.room`), if any. The main
// namespace `/` and a second one, `/desk`, behave alike; events and
// acknowledgements name their namespace (`nsp`).
// HTTP routes beside engine.io: GET /healthz (200), and
// GET /broadcast?room=R&text=T (emits `broadcast` {backend, text} to R).
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
const id = option("--id", "sio");
const port = Number(option("--port", "0"));
const pingInterval = Number(option("--ping-interval", "25000"));
// Refuse (in a middleware) connections that a router moved here.
const refuseMoved = args.includes("--refuse-moved");

const log = (event) => process.stdout.write(JSON.stringify({ backend: id, ...event }) + "\n");

const httpServer = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok\n");
  } else if (url.pathname === "/broadcast") {
    const room = url.searchParams.get("room");
    const text = url.searchParams.get("text");
    const nsp = url.searchParams.get("nsp") || "/";
    io.of(nsp).to(room).emit("broadcast", nsp === "/" ? { backend: id, text } : { backend: id, nsp, text });
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("sent\n");
  }
  // engine.io answers everything under /socket.io/.
});

const io = new Server(httpServer, {
  pingInterval,
  pingTimeout: 20000,
  cors: { origin: true, credentials: true },
});

io.use((socket, next) => {
  if (refuseMoved && socket.handshake.headers["x-wsrouter-migrated-from"]) {
    log({ event: "refused", migratedFrom: socket.handshake.headers["x-wsrouter-migrated-from"] });
    next(new Error("moved sessions are refused here"));
  } else {
    next();
  }
});

const onConnection = (nsp) => (socket) => {
  const headers = socket.handshake.headers;
  const migratedFrom = headers["x-wsrouter-migrated-from"] || null;
  const room = socket.handshake.auth && socket.handshake.auth.room;
  if (room) socket.join(room);
  log({
    event: "connection",
    nsp,
    sid: socket.id,
    transport: socket.conn.transport.name,
    migratedFrom,
    session: headers["x-wsrouter-session"] || null,
    auth: socket.handshake.auth,
  });
  socket.emit("welcome", { backend: id, sid: socket.id, migratedFrom });
  socket.on("echo", (data, ack) => {
    log({ event: "echo", nsp, data });
    if (typeof ack === "function") ack(nsp === "/" ? { backend: id, data } : { backend: id, nsp, data });
  });
  socket.on("blob", (label, blob, ack) => {
    log({ event: "blob", label, bytes: blob.length });
    if (typeof ack === "function") ack({ backend: id, label, bytes: blob.length, fill: blob[0] });
  });
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack({ backend: id, room });
  });
  socket.on("disconnect", (reason) => log({ event: "disconnect", nsp, sid: socket.id, reason }));
};
io.on("connection", onConnection("/"));
io.of("/desk").on("connection", onConnection("/desk"));

httpServer.listen(port, "127.0.0.1", () => {
  process.stdout.write(`listening ${httpServer.address().port}\n`);
});
