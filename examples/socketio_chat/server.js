// A regional Socket.IO chat server for wsrouter's demo: the real
// `socket.io` package. Visitors join a room (from the auth payload or the
// query) and what one says reaches everyone in the room on this server.
//
//   node server.js --id eu-1 --port 9011
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
const id = option("--id", "sio");
const port = Number(option("--port", "9011"));

const httpServer = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok\n");
  }
});
const io = new Server(httpServer, { cors: { origin: true } });

io.on("connection", (socket) => {
  const { auth, query, headers } = socket.handshake;
  const room = (auth && auth.room) || query.room || "lobby";
  const name = (auth && auth.name) || query.session || socket.id;
  const movedFrom = headers["x-wsrouter-migrated-from"];
  socket.join(room);
  console.log(`[${id}] ${name} joined ${room}${movedFrom ? ` (moved here from ${movedFrom})` : ""}`);
  socket.emit("system", { backend: id, text: movedFrom ? `moved to ${id} from ${movedFrom}` : `connected to ${id}` });
  socket.on("say", (text, ack) => {
    socket.to(room).emit("said", { backend: id, name, text });
    if (typeof ack === "function") ack({ backend: id });
  });
});

httpServer.listen(port, "127.0.0.1", () => console.log(`[${id}] Socket.IO chat on 127.0.0.1:${port}`));
