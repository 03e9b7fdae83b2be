// A Socket.IO 4.8 client for wsrouter's tests: the real `socket.io-client`
// package, driven by JSON lines on stdin, reporting JSON lines on stdout.
//
//   node client.js URL [OPTIONS_JSON]
//
// OPTIONS_JSON is passed to `io(URL, options)` (transports, query, auth...).
// Reports: {"event":"connect","id":...}, {"event":"disconnect","reason":...},
// {"event":"connect_error","message":...}, {"event":"upgrade","transport":...},
// {"event":"welcome"|"broadcast","data":...}, {"event":"ack","seq":N,"data":...}.
// Commands: {"cmd":"emit","event":E,"data":D,"seq":N} (with an
// acknowledgement, reported with its seq; "nsp" sends on another
// namespace), {"cmd":"emit_blob","label":L, "bytes":B,"seq":N} (a binary
// event: B bytes, each seq % 256), {"cmd":"join","nsp":NSP,"auth":A} (a
// socket on another namespace of the same connection, whose events are
// reported with "nsp"), {"cmd":"close"}.
"use strict";
const readline = require("readline");
const { io } = require("socket.io-client");

const url = process.argv[2];
const options = JSON.parse(process.argv[3] || "{}");
const report = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const socket = io(url, { reconnectionDelay: 200, reconnectionDelayMax: 1000, ...options });
socket.io.on("open", () => {
  socket.io.engine.on("upgrade", (transport) => report({ event: "upgrade", transport: transport.name }));
});
socket.on("connect", () => {
  report({ event: "connect", id: socket.id, transport: socket.io.engine.transport.name });
});
socket.on("disconnect", (reason) => report({ event: "disconnect", reason }));
socket.on("connect_error", (error) => report({ event: "connect_error", message: error.message }));
socket.on("welcome", (data) => report({ event: "welcome", data }));
socket.on("broadcast", (data) => report({ event: "broadcast", data }));
const sockets = { "/": socket };

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "emit") {
    sockets[command.nsp || "/"].emit(command.event, command.data, (data) => report({ event: "ack", seq: command.seq, data }));
  } else if (command.cmd === "emit_blob") {
    // A binary event: its attachment travels as a frame of its own.
    const blob = Buffer.alloc(command.bytes, command.seq % 256);
    socket.emit("blob", command.label, blob, (data) => report({ event: "ack", seq: command.seq, data }));
  } else if (command.cmd === "join") {
    const nsp = command.nsp;
    const other = socket.io.socket(nsp, { auth: command.auth || {} });
    sockets[nsp] = other;
    other.on("connect", () => report({ event: "connect", nsp, id: other.id }));
    other.on("disconnect", (reason) => report({ event: "disconnect", nsp, reason }));
    other.on("connect_error", (error) => report({ event: "connect_error", nsp, message: error.message }));
    other.on("broadcast", (data) => report({ event: "broadcast", nsp, data }));
    // It connects by itself (the manager's autoConnect).
  } else if (command.cmd === "close") {
    socket.close();
    process.exit(0);
  }
});
