"""Round trip of a paid Pylon job from outside, through a third-party relay and through our own.

    python bench/bench_pylon.py [--jobs 40] [--warmup 5]

The customer is a `PylonLM.new_swarm(...)` client with an NWC wallet; the provider is
`python -m dsrs.pylon.serve` in its own process, selling `openai/bench` backed by bench/server.py
(the fast fake OpenAI server, its own process: model time ~0); the NIP-47 wallet service
(tests/nwc_service.py, payment_received notifications on) runs in its own process. Each job:
publish the 5050, get the quote (make_invoice by the provider's wallet), pay it (pay_invoice), the
provider sees the payment (notification), runs the model and publishes the 6050; the client
checks it and publishes its kind-5 cancel. Timed: `await lm.acall(...)`, jobs one after another.
Four processes besides the relay: the customer (this one), the provider, the wallet service,
the model server.

Relays, in the same run: PyPI nostr-relay 1.14 (unmodified, its own config.yaml's storage options:
validators, 2 concurrent writes; SQLite on disk; DSRS_TEST_NOSTR_RELAY or --nostr-relay, as
installed by scripts/test) and tests/relay.py (our small in-process relay, events in memory).
Baselines from the same run: one relay echo (publish an event, get it back on a subscription) on
each relay, and one direct model call. Prints p50/p90 and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # relay.py, nwc_service.py (the test relay and wallet service)
sys.path.insert(0, str(ROOT / "src"))

from nwc_service import Ledger, WalletService  # noqa: E402
from relay import TestRelay  # noqa: E402

from dsrs import LM  # noqa: E402
from dsrs.nostr import Keys, Relay, sign  # noqa: E402
from dsrs.pylon import NwcWallet, PylonLM, pools  # noqa: E402

PRICE = 1000
PROMPT = "Question: What is the capital of France?\nAnswer:"
STOCK_STORAGE = {"num_concurrent_reqs": 10, "num_concurrent_adds": 2,
                 "validators": ["nostr_relay.validators.is_not_too_large", "nostr_relay.validators.is_signed",
                                "nostr_relay.validators.is_recent", "nostr_relay.validators.is_not_hellthread"]}  # fmt: skip


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stock(exe: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """nostr-relay as shipped (its config.yaml's storage options), SQLite in workdir, on 127.0.0.1."""
    import urllib.request

    port = free_port()
    conf = {"DEBUG": False, "relay_name": "stock nostr-relay",
            "storage": {"sqlalchemy.url": f"sqlite+aiosqlite:///{workdir / 'relay.sqlite3'}", **STOCK_STORAGE},
            "gunicorn": {"bind": f"127.0.0.1:{port}", "workers": 1, "loglevel": "warning", "reload": False},
            "verification": {"nip05_verification": "disabled"}, "authentication": {"enabled": False},
            "logging": {"version": 1, "root": {"level": "WARNING", "handlers": []}}}  # fmt: skip
    (workdir / "config.yaml").write_text(json.dumps(conf))
    proc = subprocess.Popen([exe, "-c", str(workdir / "config.yaml"), "serve", "--use-uvicorn"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Accept": "application/nostr+json"})
    for _ in range(600):
        try:
            with urllib.request.urlopen(req, timeout=2):
                return proc, f"ws://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("nostr-relay did not start")


def start_model() -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "server.py"), "--port", "0"], stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode()  # type: ignore[union-attr]
    return proc, f"http://127.0.0.1:{line.split()[1]}/v1"


async def start_provider(relay_url: str, nwc: str, model_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYLON_NWC_URI": nwc, "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(ROOT / "src")}
    env.pop("PYLON_NSEC", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dsrs.pylon.serve", "--backend", "openai/bench", "--base-url", model_url,
        "--price-msats", str(PRICE), "--relay", relay_url, stdout=subprocess.PIPE, env=env)  # fmt: skip
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()  # type: ignore[union-attr]
    assert line.startswith("serving as"), line
    return proc  # type: ignore[return-value]


async def echo(url: str, n: int) -> list[float]:
    """Publish an event and get it back on a subscription: one relay hop each way."""
    k = Keys.generate()
    r = Relay(url, k)
    sub = await r.subscribe([{"kinds": [1], "authors": [k.pubkey]}])
    await sub.eose.wait()
    out = []
    for i in range(n):
        t = time.perf_counter()
        await r.publish(sign(k, 1, f"echo {i}"))
        await sub.next(10)
        out.append(time.perf_counter() - t)
    await r.close()
    return out


async def wallet_main(relay_url: str) -> None:
    """`--wallet-service URL`: the NIP-47 wallet service in its own process (as a real one would be).
    Prints the payer's and the payee's URIs, serves until stdin closes, then prints its books."""
    ledger = Ledger()
    svc = WalletService(relay_url, ledger)
    await svc.start()
    payer, payee = ledger.open(10**9), ledger.open(0)
    print(svc.uri(payer), svc.uri(payee), sep="\n", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    books = {"paid": ledger.paid_total(payer), "received": payee.balance_msats,
             "provider_lookups": svc.count("lookup_invoice", payee), "make_invoice": svc.count("make_invoice", payee)}  # fmt: skip
    print(json.dumps(books), flush=True)
    await svc.stop()


async def round_trips(name: str, relay_url: str, model_url: str, jobs: int, warmup: int) -> dict[str, Any]:
    wallet = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--wallet-service", relay_url, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    assert wallet.stdout is not None and wallet.stdin is not None
    payer_uri = (await wallet.stdout.readline()).decode().strip()
    payee_uri = (await wallet.stdout.readline()).decode().strip()
    prov = await start_provider(relay_url, payee_uri, model_url)
    lm = (PylonLM.new_swarm(relay_url).with_wallet(NwcWallet(payer_uri, timeout=10)).with_budget_msats(10**9)
          .with_bid_msats(5000).with_timeout(30).with_max_tokens(16))  # fmt: skip
    times = []
    try:
        for i in range(warmup + jobs):
            t = time.perf_counter()
            c = await lm.acall(PROMPT)
            dt = time.perf_counter() - t
            assert c.usage.cost_msats == PRICE and c.text, c
            if i >= warmup:
                times.append(dt)
        hops = await echo(relay_url, 30)
    finally:
        prov.terminate()
        await prov.wait()
        await pools.aclose()
        wallet.stdin.close()
        books = json.loads((await wallet.stdout.readline()) or b"{}")
        await wallet.wait()
    assert books["paid"] == books["received"] == (warmup + jobs) * PRICE, books
    return {"name": name, "times": times, "echo": hops, "lookups": books["provider_lookups"]}


async def direct_model(model_url: str, n: int = 30) -> list[float]:
    lm = LM("openai/bench", base_url=model_url, api_key="sk-bench").with_max_tokens(16)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await lm.acall(PROMPT)
        out.append(time.perf_counter() - t)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--wallet-service", metavar="RELAY_URL", help=argparse.SUPPRESS)
    ap.add_argument("--nostr-relay", default=os.environ.get("DSRS_TEST_NOSTR_RELAY")
                    or os.path.expanduser("~/.cache/dsrs-test/nostr-relay-1.14/bin/nostr-relay"))  # fmt: skip
    args = ap.parse_args()
    if args.wallet_service:
        return await wallet_main(args.wallet_service)
    load0 = os.getloadavg()
    model, model_url = start_model()
    work = Path(tempfile.mkdtemp(prefix="bench-pylon-"))
    stock, stock_url = start_stock(args.nostr_relay, work)
    own = TestRelay()
    await own.start()
    results = []
    try:
        base = await direct_model(model_url)
        for name, url in (("nostr-relay 1.14 (stock)", stock_url), ("own relay (tests/relay.py)", own.url)):
            results.append(await round_trips(name, url, model_url, args.jobs, args.warmup))
    finally:
        await own.stop()
        stock.terminate()
        stock.wait(10)
        model.terminate()
        model.wait(10)
    load1 = os.getloadavg()
    print(f"paid job round trip, {args.jobs} jobs one after another after {args.warmup} warm-up, price {PRICE} msats, "
          f"payment seen by wallet notification")  # fmt: skip
    print(f"direct model call (bench/server.py): p50 {ms(statistics.median(base))} ms")
    for r in results:
        t, e = r["times"], r["echo"]
        print(f"{r['name']:<28} round trip p50 {ms(pct(t, 50))} ms, p90 {ms(pct(t, 90))} ms, max {ms(max(t))} ms | "
              f"relay echo p50 {ms(pct(e, 50))} ms | round trip / echo {pct(t, 50) / pct(e, 50):.1f}x | "
              f"lookup_invoice calls {r['lookups']}")  # fmt: skip
    print(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end "
          f"({os.cpu_count()} cores)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
