"""The whole API key flow from Python, with stubs generated from the .proto alone.

    python -m grpc_tools.protoc -I proto --python_out=OUT --grpc_python_out=OUT \
        proto/cloodot/apikeys/v1/api_keys.proto
    PYTHONPATH=OUT python clients/python/flow.py 127.0.0.1:50051

create -> validate (VALID) -> list (masked) -> delete -> validate (DELETED). Exits non-zero
on the first surprise.
"""

import sys

import grpc
from cloodot.apikeys.v1 import api_keys_pb2 as pb
from cloodot.apikeys.v1 import api_keys_pb2_grpc as rpc

ACTOR = (("x-actor-id", "user_py"), ("x-actor-role", "admin"))


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def main(address):
    with grpc.insecure_channel(address) as channel:
        keys = rpc.ApiKeysStub(channel)

        created = keys.CreateKey(
            pb.CreateKeyRequest(workspace_id="py-flow", name="Python script", expiration=pb.EXPIRATION_30_DAYS),
            metadata=ACTOR,
        )
        secret = created.secret
        check(secret.startswith("clo_") and len(secret) == 42, "CreateKey returns a 42-character clo_ secret")
        check(created.key.created_by == "user_py", "the key records who created it")
        check(created.key.HasField("expire_time"), "a 30-day key has an expire_time")

        valid = keys.ValidateKey(pb.ValidateKeyRequest(key=secret))
        check(valid.valid and valid.result == pb.VALIDATION_RESULT_VALID, "the new key validates")
        check(valid.key_id == created.key.id and valid.workspace_id == "py-flow", "validation names the key")

        listed = keys.ListKeys(pb.ListKeysRequest(workspace_id="py-flow"), metadata=ACTOR)
        check([k.id for k in listed.keys] == [created.key.id], "ListKeys shows the key")
        check(listed.keys[0].masked_key == "clo_********" + secret[-4:], "the listed key is masked")
        check(secret not in str(listed), "the list never carries the secret")
        check(listed.keys[0].status == pb.KEY_STATUS_ACTIVE, "the key is active")

        keys.DeleteKey(pb.DeleteKeyRequest(workspace_id="py-flow", key_id=created.key.id), metadata=ACTOR)
        deleted = keys.ValidateKey(pb.ValidateKeyRequest(key=secret))
        check(not deleted.valid and deleted.result == pb.VALIDATION_RESULT_DELETED, "the deleted key is rejected")

        malformed = keys.ValidateKey(pb.ValidateKeyRequest(key="not a key"))
        check(malformed.result == pb.VALIDATION_RESULT_MALFORMED, "garbage is MALFORMED")

        try:
            keys.ListKeys(pb.ListKeysRequest(workspace_id="py-flow"))
            check(False, "ListKeys without an actor is refused")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.UNAUTHENTICATED, "ListKeys without an actor is UNAUTHENTICATED")
    print("python client flow: every check passed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
