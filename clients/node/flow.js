// The API key flow from a second gRPC implementation: Node's @grpc/grpc-js, with the
// contract loaded from the .proto at run time by @grpc/proto-loader.
//
//     npm ci --prefix clients/node
//     node clients/node/flow.js 127.0.0.1:50051
//
// create -> validate (VALID) -> ValidateKeys stream (answers by id) -> list (masked) ->
// update scopes -> validate with a required scope -> delete -> validate (DELETED) ->
// malformed -> an error's ErrorInfo reason. Exits non-zero on the first surprise.

"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO = path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync("cloodot/apikeys/v1/api_keys.proto", {
  includeDirs: [PROTO],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { ApiKeys } = grpc.loadPackageDefinition(definition).cloodot.apikeys.v1;

// google.rpc.Status and ErrorInfo, the two messages an error's details need, as published in
// googleapis (google/rpc/status.proto, google/rpc/error_details.proto).
const rpcTypes = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`).root;

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

function actor() {
  const metadata = new grpc.Metadata();
  metadata.set("x-actor-id", "user_node");
  metadata.set("x-actor-role", "admin");
  return metadata;
}

function call(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10_000 }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

function errorReason(err) {
  const [bytes] = err.metadata.get("grpc-status-details-bin");
  if (!bytes) return undefined;
  const status = rpcTypes.lookupType("google.rpc.Status").decode(bytes);
  const info = status.details.find((d) => d.typeUrl.endsWith("/google.rpc.ErrorInfo"));
  return info && rpcTypes.lookupType("google.rpc.ErrorInfo").decode(info.value).reason;
}

function validateStream(client, requests) {
  return new Promise((resolve, reject) => {
    const stream = client.ValidateKeys({ deadline: Date.now() + 10_000 });
    const answers = new Map();
    stream.on("data", (answer) => answers.set(answer.request_id, answer.response));
    stream.on("error", reject);
    stream.on("end", () => resolve(answers));
    for (const [id, key] of requests) stream.write({ request_id: id, request: { key } });
    stream.end();
  });
}

async function main(address) {
  const client = new ApiKeys(address, grpc.credentials.createInsecure());
  const workspace = "node-flow";

  const created = await call(
    client,
    "CreateKey",
    { workspace_id: workspace, name: "Node script", expiration: "EXPIRATION_30_DAYS" },
    actor(),
  );
  const secret = created.secret;
  check(/^clo_[0-9A-Za-z]{38}$/.test(secret), "CreateKey returns a 42-character clo_ secret");
  check(created.key.created_by === "user_node", "the key records who created it");
  check(created.key.expire_time !== null, "a 30-day key has an expire_time");

  const valid = await call(client, "ValidateKey", { key: secret });
  check(valid.valid && valid.result === "VALIDATION_RESULT_VALID", "the new key validates");
  check(valid.key_id === created.key.id && valid.workspace_id === workspace, "validation names the key");

  const answers = await validateStream(client, [
    ["7", secret],
    ["8", "clo_not-a-key"],
  ]);
  check(answers.size === 2, "ValidateKeys answers every request");
  check(answers.get("7").result === "VALIDATION_RESULT_VALID", "the stream's answer 7 is VALID");
  check(answers.get("8").result === "VALIDATION_RESULT_MALFORMED", "the stream's answer 8 is MALFORMED");

  const listed = await call(client, "ListKeys", { workspace_id: workspace }, actor());
  check(listed.keys.length === 1 && listed.keys[0].id === created.key.id, "ListKeys shows the key");
  check(listed.keys[0].masked_key === "clo_********" + secret.slice(-4), "the listed key is masked");
  check(!JSON.stringify(listed).includes(secret), "the list never carries the secret");
  check(listed.keys[0].status === "KEY_STATUS_ACTIVE", "the key is active");

  const updated = await call(
    client,
    "UpdateKey",
    {
      key: { workspace_id: workspace, id: created.key.id, scopes: ["reports:read"] },
      update_mask: { paths: ["scopes"] },
    },
    actor(),
  );
  check(updated.scopes.join() === "reports:read", "UpdateKey sets the scopes named in its mask");
  const scoped = await call(client, "ValidateKey", { key: secret, required_scopes: ["reports:read"] });
  check(scoped.result === "VALIDATION_RESULT_VALID", "the key now has the scope a route requires");
  const unscoped = await call(client, "ValidateKey", { key: secret, required_scopes: ["reports:write"] });
  check(unscoped.result === "VALIDATION_RESULT_INSUFFICIENT_SCOPE", "and lacks one it was not given");

  await call(client, "DeleteKey", { workspace_id: workspace, key_id: created.key.id }, actor());
  const deleted = await call(client, "ValidateKey", { key: secret });
  check(!deleted.valid && deleted.result === "VALIDATION_RESULT_DELETED", "the deleted key is rejected");

  const malformed = await call(client, "ValidateKey", { key: "not a key" });
  check(malformed.result === "VALIDATION_RESULT_MALFORMED", "garbage is MALFORMED");

  try {
    await call(client, "ListKeys", { workspace_id: workspace });
    check(false, "ListKeys without an actor is refused");
  } catch (err) {
    check(err.code === grpc.status.UNAUTHENTICATED, "ListKeys without an actor is UNAUTHENTICATED");
    check(errorReason(err) === "ACTOR_MISSING", "its ErrorInfo reason is ACTOR_MISSING");
  }
  client.close();
  console.log("the Node flow passed");
}

main(process.argv[2] || "127.0.0.1:50051").catch((err) => {
  console.error(`FAILED: ${err.stack || err}`);
  process.exit(1);
});
