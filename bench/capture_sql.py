"""Prints the SQL the service sends today for ReserveCredit, Commit, Refund and CheckAccess.

    python -m bench.capture_sql

Starts a throwaway PostgreSQL and one server, sends each RPC once, and prints the statements
pg_stat_statements saw (bind parameters as $n). The pgbench script is generated from the same
statements (python -m bench.pgbench_script).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from bench import seed, workload
from bench.pg import Cluster
from bench.servers import Servers
from billing_service.storage.migrations import migrate


def main() -> int:
    cluster = Cluster(max_connections=100)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-capture-") as work:
            prices = Path(work) / "prices.toml"
            prices.write_text(workload.PRICE_TABLE_TOML)
            url = cluster.create_database("bench_capture")
            with asyncio.Runner() as runner:
                runner.run(cluster.open())
                runner.run(migrate(url))
                dbid = runner.run(cluster.database_oid("bench_capture"))
                servers = Servers(url, 1, pool_size=2, price_table=prices, extra_settings={})
                try:
                    seed.create_tenant_via_admin(servers.addresses[0], "capture-1")
                    from bench.sqlcapture import capture

                    captured = runner.run(capture(cluster, dbid, servers.addresses[0], "capture-1"))
                finally:
                    servers.stop()
                    runner.run(cluster.close())
    finally:
        cluster.stop()
    for rpc, statements in captured["statements"].items():
        print(f"-- {rpc}: {len(statements)} statement(s)")
        for statement in statements:
            print(statement + ";")
        print()
    print(f"-- service-sql-fingerprint: {captured['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
