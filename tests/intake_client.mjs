// A client of the HTTP intake written in JavaScript (node's built-in fetch, crypto, http):
// streams a file as the request body, waits for the signed completion callback, verifies it.
// Usage: node intake_client.mjs BASE_URL TOKEN CALLBACK_SECRET TARGET FILE PORT
// Prints one JSON line: {"verified": bool, "type": ..., "file_id": ...}; exits 1 on failure.
import { createHmac, timingSafeEqual } from "node:crypto";
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { basename } from "node:path";
import { Readable } from "node:stream";

const [base, token, secret, target, file, port] = process.argv.slice(2);

function verify(headers, body) {
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const signed = `${headers["webhook-id"]}.${headers["webhook-timestamp"]}.${body}`;
  const expected = Buffer.from(createHmac("sha256", key).update(signed).digest("base64"));
  return headers["webhook-signature"].split(" ").some((s) => {
    const given = Buffer.from(s.replace(/^v1,/, ""));
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
}

const callback = new Promise((resolve) => {
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      res.writeHead(204).end();
      server.close();
      const body = Buffer.concat(chunks).toString("utf8");
      resolve({ verified: verify(req.headers, body), event: JSON.parse(body) });
    });
  });
  server.listen(Number(port), "127.0.0.1");
});

const params = new URLSearchParams({
  to: target,
  name: basename(file),
  callback_url: `http://127.0.0.1:${port}/done`,
});
const resp = await fetch(`${base}/v1/jobs?${params}`, {
  method: "POST",
  headers: {
    Authorization: `Bearer ${token}`,
    "Content-Type": "application/octet-stream",
    "Content-Length": String(statSync(file).size),
  },
  body: Readable.toWeb(createReadStream(file)), // streamed, never read whole
  duplex: "half",
});
if (resp.status !== 202) {
  console.error(`enqueue answered ${resp.status}: ${await resp.text()}`);
  process.exit(1);
}
const job = await resp.json();
const timer = setTimeout(() => {
  console.error("no callback within 60 s");
  process.exit(1);
}, 60000);
const { verified, event } = await callback;
clearTimeout(timer);
if (event.data.id !== job.id) {
  console.error(`callback for ${event.data.id}, expected ${job.id}`);
  process.exit(1);
}
console.log(JSON.stringify({ verified, type: event.type, file_id: event.data.file_id }));
process.exit(verified ? 0 : 1);
