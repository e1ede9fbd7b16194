#!/usr/bin/env python3
"""Runs every grpcurl (and `buf curl`) example in README.md with the real tool, in order, and
checks each answer against the output printed under it.

    python3 clients/grpcurl/readme.py target/release/apikeys     # grpcurl and buf on PATH

It starts two servers of its own on loopback, each on a fresh SQLite database: one as the
README's "cargo run --release" (no callers file, at 127.0.0.1:50051 in the README), and one
with a callers file (127.0.0.1:50052), its admin token in `APIKEYS_CALLER_TOKEN`. Each command runs in bash as printed; only the
address, and the secrets and ids the service handed out earlier in the run, are substituted.
Answers are compared field by field: ids, secrets, masked keys, page tokens and times by
shape, and the same printed value must stand for the same real one throughout (an id shown
by CreateKey and again by ListKeyEvents is the same key). An example followed by a `text`
block (an error report, a service list) is compared line by line. Read-only calls (Get*, List*,
Health) are retried for a few seconds, since usage is written within the flush interval.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
# The README's addresses: the server as `cargo run --release` starts it, and one with a
# callers file (`--callers-file callers --listen 127.0.0.1:50052`).
PLAIN_ADDRESS, GUARDED_ADDRESS = "127.0.0.1:50051", "127.0.0.1:50052"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z"
# Values that differ on every run, by field name, with the shape each must have.
SHAPES = {
    "id": r"key_[0-9A-Za-z]{20}|evt_\d+",
    "keyId": r"key_[0-9A-Za-z]{20}",
    "newKeyId": r"key_[0-9A-Za-z]{20}",
    "secret": r"clo_[0-9A-Za-z]{38}",
    "maskedKey": r"clo_\*{8}[0-9A-Za-z]{4}",
    "nextPageToken": r"[0-9A-Za-z_-]+",
    "createTime": TIME,
    "expireTime": TIME,
    "lastUsedTime": TIME,
    "startTime": TIME,
    "resetTime": TIME,
    "retryAfter": r"\d+(\.\d{1,3})?s",
    "etag": r"[0-9a-f]{16}",
}
READ_ONLY = re.compile(r"/(Get|List)\w*$|Health/Check$")


def blocks(text):
    """The README's fenced blocks, as (language, body)."""
    found, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                found.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return found


def examples(text):
    pairs = []
    found = blocks(text)
    for (lang, command), following in zip(found, found[1:] + [("", "")]):
        if lang != "sh" or not ("grpcurl " in command or "buf curl " in command):
            continue
        out_lang, output = following
        if out_lang not in ("json", "text"):
            sys.exit(f"README: an example without its output:\n{command}")
        pairs.append((command, out_lang, output))
    return pairs


def messages(text):
    """One JSON message or several in a row (a stream's), as a list."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return found
        value, i = decoder.raw_decode(text, i)
        found.append(value)


class Run:
    def __init__(self):
        self.real = {}  # printed value -> the value this run got
        self.printed = {}  # and back: one real value for one printed value

    def same(self, printed, real, where):
        if printed in self.real and self.real[printed] != real:
            raise Mismatch(f"{where}: {real!r}, but {printed!r} was {self.real[printed]!r} before")
        if real in self.printed and self.printed[real] != printed:
            raise Mismatch(
                f"{where}: the README prints {printed!r} here and {self.printed[real]!r} "
                f"earlier for the same value {real!r}"
            )
        self.real[printed], self.printed[real] = real, printed

    def compare(self, printed, real, where):
        if isinstance(printed, dict) and isinstance(real, dict):
            if sorted(printed) != sorted(real):
                raise Mismatch(f"{where}: fields {sorted(real)}, README shows {sorted(printed)}")
            for name in printed:
                shape = SHAPES.get(name)
                if shape and isinstance(printed[name], str):
                    if not re.fullmatch(shape, real[name]):
                        raise Mismatch(f"{where}.{name}: {real[name]!r} is not like {printed[name]!r}")
                    if not name.endswith("Time"):
                        self.same(printed[name], real[name], f"{where}.{name}")
                else:
                    self.compare(printed[name], real[name], f"{where}.{name}")
        elif isinstance(printed, list) and isinstance(real, list):
            if len(printed) != len(real):
                raise Mismatch(f"{where}: {len(real)} items, README shows {len(printed)}")
            for i, (p, r) in enumerate(zip(printed, real)):
                self.compare(p, r, f"{where}[{i}]")
        elif printed != real:
            raise Mismatch(f"{where}: {real!r}, README shows {printed!r}")

    def substitute(self, text):
        for printed in sorted(self.real, key=len, reverse=True):
            text = text.replace(printed, self.real[printed])
        return text


class Mismatch(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, work, name, *flags):
    port = free_port()
    log = open(os.path.join(work, f"{name}.log"), "w+")
    env = dict(os.environ, RUST_LOG="info")
    server = subprocess.Popen(
        [
            binary,
            "--listen",
            f"127.0.0.1:{port}",
            "--database-url",
            f"sqlite://{work}/{name}.db?mode=rwc",
            *flags,
        ],
        stderr=log,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 30
    while "serving gRPC" not in open(log.name).read():
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name} server did not start:\n{open(log.name).read()}")
        time.sleep(0.05)
    return server, f"127.0.0.1:{port}"


def caller_token(binary, work):
    printed = subprocess.run(
        [binary, "caller-token", "new", "readme-admin", "--role", "admin"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [line for line in printed.splitlines() if not line.startswith("#")]
    token = next(line for line in lines if line.startswith("cct_"))
    entry = next(line for line in lines if line.startswith("readme-admin "))
    path = os.path.join(work, "callers")
    with open(path, "w") as f:
        f.write(entry + "\n")
    os.chmod(path, 0o600)
    return token, path


def main():
    binary = os.path.abspath(sys.argv[1])
    readme = open(README).read()
    pairs = examples(readme)
    run = Run()
    with tempfile.TemporaryDirectory() as work:
        token, callers = caller_token(binary, work)
        plain, plain_addr = start(binary, work, "plain")
        guarded, guarded_addr = start(binary, work, "callers", "--callers-file", callers)
        try:
            for n, (command, out_lang, output) in enumerate(pairs, 1):
                shell = (
                    run.substitute(command)
                    .replace(PLAIN_ADDRESS, plain_addr)
                    .replace(GUARDED_ADDRESS, guarded_addr)
                )
                method = shell.split()[-1]
                deadline = time.monotonic() + (5 if READ_ONLY.search(method) else 0)
                while True:
                    done = subprocess.run(
                        ["bash", "-c", shell],
                        capture_output=True,
                        text=True,
                        env=dict(os.environ, APIKEYS_CALLER_TOKEN=token),
                        timeout=30,
                    )
                    try:
                        check(run, n, method, done, out_lang, output)
                        break
                    except Mismatch as mismatch:
                        if time.monotonic() > deadline:
                            sys.exit(
                                f"README example {n} ({method}) does not answer as printed:\n"
                                f"{mismatch}\n--- command\n{command}--- stdout\n{done.stdout}"
                                f"--- stderr\n{done.stderr}"
                            )
                        time.sleep(0.2)
                print(f"ok {n:2} {method}")
        finally:
            for server in (plain, guarded):
                server.terminate()
                server.wait(timeout=30)
    print(f"all {len(pairs)} README grpcurl and buf curl examples answer as printed")


def check(run, n, method, done, out_lang, output):
    if out_lang == "json":
        if done.returncode != 0:
            raise Mismatch(f"grpcurl exited {done.returncode}")
        real = messages(done.stdout)
        printed = messages(output)
        run.compare(printed, real, method.rsplit("/", 1)[-1])
        return
    # Text as grpcurl prints it (an error report, a service list): the same lines, spaces
    # and tabs alike, once the values handed out are substituted.
    printed = [" ".join(line.split()) for line in run.substitute(output).strip().splitlines()]
    answer = done.stderr if done.returncode != 0 else done.stdout
    real = [" ".join(line.split()) for line in answer.strip().splitlines()]
    if real != printed:
        raise Mismatch("the text differs:\n" + "\n".join(real))

if __name__ == "__main__":
    main()
