"""The benchmark's one table, ratios and goals, as Markdown, from the results dict."""

from __future__ import annotations

from typing import Any

FLUSH_MS = 200


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 1 else f"{x:.1f} ms"


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    s = r.get("settings", {})
    cfg = f"{_batch(s)}, depth {s.get('depth')}"

    def rate_row(key: str, label: str, detail: str) -> None:
        if key in r:
            m = r[key]
            rows.append(
                (label, _n(m["rate"]), f"{_n(m['msgs'])} msgs in {m['seconds']:.2f} s; {detail}")
            )

    rate_row("n0", "0. N0: bare thin pull + ack, plain asyncio", f"no Trio, no bridge, {cfg}")
    rate_row("n", "1. Ceiling N: JetStream pull + ack, no DB", f"NatsBridge.run_pull, {cfg}")
    rate_row("p", "2. Ceiling P: COPY, no NATS", f"Storage.write_batch, {s.get('batch')} rows/txn")
    if "p" in r and "last_seen_upserts_per_s" in r["p"]:
        p = r["p"]
        rows.append(
            (
                "2b. Last-seen flush (upsert into gateway_liveness)",
                f"{_n(p['last_seen_upserts_per_s'])} gateways/s",
                f"{100 * p['last_seen_share']:.0f}% of the write path's database time at "
                f"{p['gateways_per_batch']:.0f} gateways per {p['batch']}-row batch; the "
                "daemon writes each gateway at most once a second, off the ingest path",
            )
        )
    rate_row("g", "3. Baseline G: Go strategy", "fast pull, 100 INSERTs/txn (pipeline), 500 ms")
    rate_row("naive", "4. Naive port", "pull_subscribe+fetch(100), 100 INSERTs, ack each")
    ours = None
    for i, d in enumerate(r.get("daemon", [])):
        label = f"5. Daemon (ours), {d.get('label', '')}: {_batch(d)}, depth {d['depth']}"
        if i == 0:
            ours = d["rate"]
            label += " [ratios]"
        detail = (
            f"{_n(d['msgs'])} msgs in {d['seconds']:.2f} s, committed+acked; "
            f"peak RSS {d['daemon_peak_rss_mib']:.0f} MiB; exit {d['exit_code']}"
            + (f", {d['exit_s']:.2f} s after SIGTERM" if "exit_s" in d else "")
        )
        rows.append((label, _n(d["rate"]), detail))
        for key, what in (("latency", "half load"), ("light", "light load")):
            lat = d.get(key)
            if lat:
                rows.append(
                    (
                        f"5. Latency publish->commit at {_n(lat['published_rate'])} msgs/s "
                        f"({what}, {_n(lat['measured_rows'])} rows)",
                        f"p50 {lat['p50_ms']:.0f} ms",
                        f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms "
                        f"(target rate {_n(lat['target_rate'])})",
                    )
                )
                if lat.get("ack_lag_p50_ms") is not None:
                    rows.append(
                        (
                            f"5. Oldest unacked message's age at {what} (sampled every 100 ms)",
                            f"p50 {lat['ack_lag_p50_ms']:.0f} ms",
                            f"p99 {lat['ack_lag_p99_ms']:.0f} ms, "
                            f"max {lat['ack_lag_max_ms']:.0f} ms: how far the liveness horizon "
                            "trails",
                        )
                    )
    for run in r.get("replicas", []):
        rows.append(
            (
                f"5b. Ingest with {run['replicas']} replica(s), one durable",
                _n(run["rate"]),
                f"{_n(run['msgs'])} msgs in {run['seconds']:.2f} s; written per replica "
                + ", ".join(_n(w) for w in run["written_by_replica"])
                + "; 2 cores shared with nats-server and PostgreSQL",
            )
        )
    for size, t in r.get("tick", {}).items():
        rows.append(
            (
                f"6. Liveness (state in PostgreSQL), {_n(int(size))} gateways",
                f"tick, none due {_ms(t['none_due_ms'])}",
                f"takeover load {_ms(t['load_ms'])}; 1% due ({_n(t['due'])} alerts, instant "
                f"fakes) {_ms(t['one_pct_due_ms'])}; 1% changed {_ms(t['one_pct_changed_ms'])}",
            )
        )
    outage = r.get("outage", {})
    labels = {"1ms": "stand-ins answering in 1 ms", "never": "get-status never answers"}
    for api, label in labels.items():
        if api in outage:
            o = outage[api]
            rows.append(
                (
                    f"6. Mass outage: {_n(o['silent'])} of {_n(outage['size'])} gateways due at "
                    f"once, {label}",
                    f"tick {_ms(o['tick_ms'])}",
                    f"every one alerted (PubAck) and marked offline with its report queued; "
                    f"{_n(o['get_status_requests'])} get-status requests; the 5 ticks after it "
                    f"(none due; the first reads the 100k transitions back) "
                    + ", ".join(_ms(v) for v in o.get("none_due_all_ms", [o["none_due_ms"]])),
                )
            )
            if "wave" in o:
                w = o["wave"]
                rows.append(
                    (
                        f"6. The same wave through the leader's loop (tick "
                        f"{w['tick_interval_s']:.0f} s), {label}",
                        f"all offline {w['all_offline_s']:.1f} s after becoming due",
                        f"first alert {w['first_alert_s']:.2f} s after; {w['ticks']:.0f} ticks "
                        "from the takeover to the last (an early tick when they became due)",
                    )
                )
    if "rss" in r:
        m = r["rss"]
        rows.append(
            (
                f"6. Leader memory per tracked gateway ({_n(m['count'])})",
                f"{m['bytes_per_gateway']:.0f} B",
                "RSS growth of the takeover's load, keys included; "
                f"{m.get('traced_bytes_per_gateway', 0):.0f} B still allocated (tracemalloc)",
            )
        )
    if "flush" in r:
        f = r["flush"]
        rows.append(
            (
                f"6. Last-seen backlog after an outage, {_n(f['count'])} gateways",
                f"flushed in {f['flush_s']:.1f} s",
                f"{f['transactions']} transactions of at most 10,000 gateways; acked after all",
            )
        )
    if "dbdown" in r:
        d = r["dbdown"]
        rows.append(
            (
                f"7. Database down {d['outage_s']:.0f} s, {_n(d['gateways'])} gateways heard "
                f"meanwhile{'' if d.get('leader', True) else ' (no leader: ingest alone)'}",
                f"last-seen flushed {d['flushed_s']:.1f} s after its return",
                f"rows committed at {d['written_s']:.1f} s, acked at {d['settled_s']:.1f} s; "
                f"{d['false_alerts']} false alerts, {_n(int(d['alerts_published']))} alerts "
                f"(timeout {d['alert_timeout_ms'] / 1000:.0f} s); "
                f"{_n(int(d['write_errors']))} failed writes, leader "
                f"{'lost' if d['leader_during_outage'] == 0 else 'kept'} during the outage",
            )
        )
    out = ["| measurement | result | detail |", "|---|---:|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out += ["", *_ratios(r, ours), "", *_decisions(r), "", *_context(r)]
    for section, error in r.get("errors", {}).items():
        out.append(f"FAILED: {section}: {error}")
    return "\n".join(out)


def _ratios(r: dict[str, Any], ours: float | None) -> list[str]:
    out = ["Ratios and goals:"]
    if "n0" in r and "n" in r:
        x = r["n"]["rate"] / r["n0"]["rate"]
        out.append(f"- N/N0 = {x:.2f} (goal >= 0.85: {_check(x >= 0.85)})")
    if ours is not None:
        if "n" in r and "p" in r:
            floor = min(r["n"]["rate"], r["p"]["rate"])
            ok = ours >= 0.6 * floor
            out.append(f"- ours/min(N,P) = {ours / floor:.2f} (goal >= 0.6: {_check(ok)})")
        if "g" in r:
            x = ours / r["g"]["rate"]
            out.append(f"- ours/G = {x:.2f} (goal >= 1.5: {_check(x >= 1.5)})")
        if "naive" in r:
            x = ours / r["naive"]["rate"]
            out.append(f"- ours/naive = {x:.2f} (goal >= 5: {_check(x >= 5)})")
        first = r["daemon"][0]
        lat = first.get("latency")
        if lat:
            ok = lat["p99_ms"] <= 2 * FLUSH_MS
            goal = 2 * FLUSH_MS
            out.append(
                f"- p99 latency at half load {lat['p99_ms']:.0f} ms (goal <= {goal} ms: "
                f"{_check(ok)})"
            )
        light = first.get("light")
        if light:
            goal = FLUSH_MS + 100
            ok = light["p99_ms"] <= goal
            out.append(
                f"- p99 latency at {_n(light['published_rate'])} msgs/s {light['p99_ms']:.0f} ms "
                f"(goal <= {goal} ms: {_check(ok)})"
            )
        fixed = [d for d in r["daemon"][1:] if d.get("batch_min", d["batch"]) == d["batch"]]
        if fixed:
            best = max(fixed, key=lambda d: d["rate"])
            out.append(
                f"- {first.get('label', 'first')} {_n(ours)} msgs/s vs the best fixed setting "
                f"{best.get('label')} {_n(best['rate'])} msgs/s: {ours / best['rate']:.2f}"
            )
        peaks = ", ".join(
            f"{d.get('label')} {d['daemon_peak_rss_mib']:.0f} MiB" for d in r["daemon"]
        )
        out.append(f"- daemon peak RSS: {peaks}")
    tick = r.get("tick", {})
    if "1000000" in tick:
        v = tick["1000000"]["load_ms"]
        out.append(f"- takeover load 1M {_ms(v)} (goal <= 2000 ms: {_check(v <= 2000)})")
    if r.get("flush", {}).get("count") == 1_000_000:
        v = r["flush"]["flush_s"]
        out.append(f"- last-seen backlog 1M flushed in {v:.1f} s (goal <= 10 s: {_check(v <= 10)})")
    if r.get("dbdown", {}).get("gateways") == 1_000_000:
        d = r["dbdown"]
        v, ok = d["flushed_s"], d["false_alerts"] == 0 and d["alerts_published"] == 0
        out.append(
            f"- database down {d['outage_s']:.0f} s, 1M heard: last-seen flushed {v:.1f} s after "
            f"its return, {'no false alert' if ok else 'ALERTS'} (goal <= 10 s, none: "
            f"{_check(v <= 10 and ok)})"
        )
    if "1000000" in tick:
        v = tick["1000000"]["none_due_ms"]
        out.append(f"- tick 1M none due {_ms(v)} (goal <= 100 ms: {_check(v <= 100)})")
    if "100000" in tick:
        v = tick["100000"]["none_due_ms"]
        out.append(f"- tick 100k none due {_ms(v)} (goal <= 10 ms: {_check(v <= 10)})")
    outage = r.get("outage", {})
    tick_s = outage.get("tick_interval_ms", 0) / 1000
    if "1ms" in outage and "wave" in outage["1ms"]:
        v = outage["1ms"]["wave"]["all_offline_s"]
        out.append(
            f"- {_n(outage['size'])} gateways, 10% due at once: all alerted and offline {v:.1f} s "
            f"after becoming due (goal <= 15 s: {_check(v <= 15)})"
        )
    elif "1ms" in outage:
        v = outage["1ms"]["tick_ms"] / 1000
        out.append(
            f"- {_n(outage['size'])} gateways, 10% due at once: all alerted and offline {v:.1f} s "
            f"after the tick began (goal <= 15 s: {_check(v <= 15)}); from becoming due at "
            f"worst one tick interval more: {tick_s + v:.1f} s"
        )
    if "1ms" in outage and "1000000" in tick:
        v = tick["1000000"]["none_due_ms"]
        out.append(f"- tick 1M none due {_ms(v)} (issue 20 goal <= 1 ms: {_check(v <= 1)})")
    if "never" in outage:
        wave = outage["never"].get("wave")
        v = wave["all_offline_s"] if wave else tick_s + outage["never"]["tick_ms"] / 1000
        how = "the leader's loop" if wave else "one tick interval + the tick"
        goal = 2 * tick_s + 30
        out.append(
            f"- the same, get-status never answers: all alerted within timeout + {v:.1f} s "
            f"({how}; goal <= timeout + 2 ticks + 30 s = timeout + "
            f"{goal:.0f} s: {_check(v <= goal)})"
        )
    if "rss" in r:
        v = r["rss"]["bytes_per_gateway"]
        out.append(f"- RSS per gateway {v:.0f} B (goal <= 1024 B: {_check(v <= 1024)})")
    return out


def _batch(d: dict[str, Any]) -> str:
    low, high = d.get("batch_min", d.get("batch")), d.get("batch")
    return f"batch {high}" if low == high else f"batch {low}-{high} (adaptive)"


def _decisions(r: dict[str, Any]) -> list[str]:
    out = []
    if "copy" in r:
        c = r["copy"]
        out.append(f"Decision a: COPY of {_n(c['rows'])} rows (rows/s, best of 3):")
        for batch, v in c.items():
            if isinstance(v, dict):
                out.append(
                    f"- {batch} rows/txn: sync conn in trio.to_thread {_n(v['thread'])}; "
                    f"async conn via trio-asyncio {_n(v['trio_asyncio'])}"
                )
    if "decode" in r:
        d = r["decode"]
        out.append(f"Decision b: decode + validate {_n(d['envelopes'])} envelopes (best of 3):")
        for name in ("json", "orjson", "msgspec"):
            v = d[name]
            out.append(f"- {name}: {v['us_per_envelope']:.2f} us/envelope ({_n(v['per_s'])}/s)")
    return out


def _context(r: dict[str, Any]) -> list[str]:
    v = r.get("versions", {})
    s = r.get("settings", {})
    return [
        f"Cores: {r.get('cores')}; load avg (1/5 min) before {r.get('load_before')}, "
        f"after {r.get('load_after')}; {'QUICK' if r.get('quick') else 'full'} run, "
        f"{_n(r.get('messages', 0))} messages from 1,000 gateways, "
        f"{r.get('wall_seconds', 0):.0f} s wall",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"Settings ({s.get('label')}): TELEMETRY_BATCH_MIN={s.get('batch_min')}, "
        f"TELEMETRY_BATCH_SIZE={s.get('batch')}, TELEMETRY_PIPELINE_DEPTH="
        f"{s.get('depth')}, TELEMETRY_FLUSH_MS={FLUSH_MS}; fsync on; nats-server mTLS "
        "(verify_and_map), file store",
    ]
