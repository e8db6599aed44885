-- One ReserveCredit followed by one Commit, as the service performs them TODAY, for pgbench.
--
-- !!! THIS SCRIPT MUST BE UPDATED WHENEVER THE HOT PATH CHANGES !!!
-- It mirrors, statement for statement and transaction for transaction, what the service sends to
-- PostgreSQL for a granted metered ReserveCredit and a Commit within the hold:
--   service/billing_service/storage/ledger_store.py  LedgerStore.place_hold / LedgerStore.commit
--   service/billing_service/storage/postgres_hot_path.py  RESERVE / COMMIT: one statement each
--     (a chain of data-modifying CTEs), run in autocommit mode: one implicit transaction each.
-- `python -m bench.capture_sql` prints the statements the service sends today and their
-- fingerprint; the harness warns (JSON "pgbench_script.current": false) when that fingerprint
-- differs from the one below. After updating this file to the new statements, update the line:
-- service-sql-fingerprint: 5ccf6fa9a412b3ad
--
-- It is the benchmark's database floor: the service cannot do this work faster than PostgreSQL
-- does it for pgbench at the same number of connections. pgbench runs it with -M prepared
-- (asyncpg prepares and caches every statement too). Each pgbench "transaction" is one
-- execution of this whole script, i.e. one query (reserve + commit): its tps compares with the
-- service's queries/s.
--
-- Differences with the service, kept small on purpose: the times are now() instead of a bind
-- parameter, ids are built from pgbench variables, and the hold's prices are literals.
--
-- Variables set by bench/pgbench.py with -D:
--   run        a number unique to this pgbench run (keeps ids unique across runs)
--   ntenants   tenants pgb-1 .. pgb-<ntenants>; 1 = one hot tenant
--   zipf_s     the Zipf exponent of the tenant choice (the load generator uses the same law)
-- The tenants pgb-* are created beforehand by the harness, all active, with a payment method on
-- file and enough credit never to be denied: a denied reservation returns no row, which makes
-- \gset fail and aborts the client, loudly.

\set t random_zipfian(1, :ntenants, :zipf_s)
\set seq random(1, 999999999999)
\set amount 2800
\set out random(1, 800)

-- ReserveCredit: postgres_hot_path.RESERVE
WITH applying AS (
    SELECT budgets.scope, budgets.scope_id, budgets.limit_micros, budgets.period,
        CASE budgets.period WHEN 'day' THEN (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') WHEN 'week' THEN (date_trunc('week', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
            WHEN 'month' THEN (date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') ELSE '1970-01-01 00:00:00+00'::TIMESTAMPTZ END AS period_start
    FROM budgets
    WHERE budgets.tenant_id = ('pgb-' || :t)::VARCHAR
        AND ((budgets.scope = 'user' AND budgets.scope_id = 'pgbench'::VARCHAR)
            OR (budgets.scope = 'api_key' AND budgets.scope_id = ''::VARCHAR))
), seen AS (
    SELECT applying.*, COALESCE(p.spent_micros, 0) AS spent_micros,
        COALESCE(p.held_micros, 0) AS held_micros
    FROM applying LEFT JOIN budget_periods AS p ON p.tenant_id = ('pgb-' || :t)::VARCHAR
        AND p.scope = applying.scope AND p.scope_id = applying.scope_id
        AND p.period_start = applying.period_start
), account AS (
    UPDATE tenants
    SET held_micros = held_micros + :amount::BIGINT
    WHERE tenant_id = ('pgb-' || :t)::VARCHAR AND status = 'active' AND billing_status = 'good_standing'
        AND (tenants.balance_micros + CASE WHEN tenants.payment_method_on_file THEN tenants.credit_limit_micros ELSE 0 END) - tenants.held_micros >= :amount::BIGINT
        AND NOT EXISTS (
            SELECT 1 FROM seen
            WHERE seen.spent_micros + seen.held_micros + :amount::BIGINT > seen.limit_micros
        )
    RETURNING tenant_id, balance_micros, held_micros, (tenants.balance_micros + CASE WHEN tenants.payment_method_on_file THEN tenants.credit_limit_micros ELSE 0 END) - tenants.held_micros AS available_micros
), taken AS (
    INSERT INTO budget_periods AS p (
        tenant_id, scope, scope_id, period_start, spent_micros, held_micros
    )
    SELECT account.tenant_id, seen.scope, seen.scope_id, seen.period_start, 0, :amount::BIGINT
    FROM account, seen
    WHERE :amount::BIGINT <= seen.limit_micros
    -- The user's row before the API key's, like the general transaction: no lock cycle.
    ORDER BY seen.scope DESC
    ON CONFLICT (tenant_id, scope, scope_id, period_start) DO UPDATE
    SET held_micros = p.held_micros + EXCLUDED.held_micros
    WHERE p.spent_micros + p.held_micros + EXCLUDED.held_micros <= (
        SELECT budgets.limit_micros FROM budgets
        WHERE budgets.tenant_id = p.tenant_id AND budgets.scope = p.scope
            AND budgets.scope_id = p.scope_id)
    RETURNING p.scope, p.scope_id, p.period_start, p.spent_micros, p.held_micros
), taken_json AS (
    SELECT json_agg(json_build_object(
            'tenant_id', ('pgb-' || :t)::VARCHAR, 'scope', seen.scope, 'scope_id', seen.scope_id,
            'limit_micros', seen.limit_micros, 'period', seen.period,
            'period_start', seen.period_start, 'spent_micros', taken.spent_micros,
            'held_micros', taken.held_micros)
            ORDER BY seen.scope DESC)::text AS budgets,
        count(*) AS taken_count
    FROM taken JOIN seen ON seen.scope = taken.scope AND seen.scope_id = taken.scope_id
), hold AS (
    INSERT INTO holds (
        hold_id, request_id, request_fingerprint, tenant_id, user_id, model, billing,
        input_micros_per_mtok, cached_input_micros_per_mtok, output_micros_per_mtok,
        flat_micros_per_call, amount_micros, status, decision_available_micros,
        refunded_micros, created_at, expires_at, api_key_id, budgets
    )
    -- A budget that the snapshot showed with room but that another call filled before its
    -- row was locked is not taken: 1 / 0 then aborts the whole statement (nothing is kept),
    -- and the caller decides in the general transaction.
    SELECT ('pgb' || :run || '-' || :client_id || '-' || :seq)::VARCHAR, ('pgbr' || :run || '-' || :client_id || '-' || :seq)::VARCHAR, '5a71811eec7f04dbb469e7155e5cfbaa9a58d1b0c6e32e8b981402276bf6ffdc'::VARCHAR, account.tenant_id, 'pgbench'::VARCHAR, 'bench-metered'::VARCHAR,
        'metered', 1000000::BIGINT, 500000::BIGINT, 2000000::BIGINT, 0::BIGINT,
        :amount::BIGINT, 'open', account.available_micros,
        0 / (taken_json.taken_count = (SELECT count(*) FROM seen))::int,
        now(), now() + interval '300 seconds', ''::VARCHAR, taken_json.budgets
    FROM account, taken_json
    RETURNING hold_id, budgets
)
INSERT INTO ledger_entries (
    tenant_id, kind, hold_id, balance_delta_micros, held_delta_micros,
    balance_after_micros, held_after_micros, available_after_micros, created_at
)
SELECT account.tenant_id, 'hold', hold.hold_id, 0, :amount::BIGINT,
    account.balance_micros, account.held_micros, account.available_micros, now()
FROM account, hold
RETURNING available_after_micros, (SELECT hold.budgets FROM hold) AS budgets \gset

-- Commit: postgres_hot_path.COMMIT
WITH claimed AS (
    UPDATE holds
    SET status = 'committed', settled_at = now()
    WHERE hold_id = ('pgb' || :run || '-' || :client_id || '-' || :seq)::VARCHAR AND status = 'open' AND expires_at > now() AND budgets IS NULL
    RETURNING hold_id, tenant_id, user_id, model, billing, amount_micros, created_at,
        flat_micros_per_call + (
        1000::BIGINT * input_micros_per_mtok
        + 200::BIGINT * cached_input_micros_per_mtok
        + :out::BIGINT * output_micros_per_mtok
        + 999999) / 1000000 AS cost_micros
), locked AS (
    SELECT tenants.tenant_id, (tenants.balance_micros + CASE WHEN tenants.payment_method_on_file THEN tenants.credit_limit_micros ELSE 0 END) - tenants.held_micros AS available_micros
    FROM tenants JOIN claimed ON tenants.tenant_id = claimed.tenant_id
    WHERE claimed.billing = 'metered'
    FOR UPDATE OF tenants
), settled AS (
    SELECT claimed.*,
        CASE WHEN claimed.billing = 'metered'
            THEN LEAST(
                claimed.cost_micros,
                claimed.amount_micros + GREATEST(0, locked.available_micros))
            ELSE 0 END AS charged_micros
    FROM claimed LEFT JOIN locked ON locked.tenant_id = claimed.tenant_id
), moved AS (
    UPDATE tenants
    SET balance_micros = tenants.balance_micros - settled.charged_micros,
        held_micros = tenants.held_micros - settled.amount_micros
    FROM settled
    WHERE tenants.tenant_id = settled.tenant_id AND settled.billing = 'metered'
    RETURNING tenants.tenant_id, tenants.balance_micros, tenants.held_micros,
        (tenants.balance_micros + CASE WHEN tenants.payment_method_on_file THEN tenants.credit_limit_micros ELSE 0 END) - tenants.held_micros AS available_micros
), entry AS (
    INSERT INTO ledger_entries (
        tenant_id, kind, hold_id, balance_delta_micros, held_delta_micros,
        balance_after_micros, held_after_micros, available_after_micros, created_at
    )
    SELECT moved.tenant_id, 'debit', settled.hold_id, -settled.charged_micros,
        -settled.amount_micros, moved.balance_micros, moved.held_micros,
        moved.available_micros, now()
    FROM settled JOIN moved ON moved.tenant_id = settled.tenant_id
), unchanged AS (
    SELECT tenants.tenant_id, (tenants.balance_micros + CASE WHEN tenants.payment_method_on_file THEN tenants.credit_limit_micros ELSE 0 END) - tenants.held_micros AS available_micros
    FROM tenants JOIN claimed ON tenants.tenant_id = claimed.tenant_id
    WHERE claimed.billing <> 'metered'
), rollup AS (
    INSERT INTO usage_rollups AS r (
        tenant_id, day, model, user_id, call_count, input_tokens, cached_input_tokens,
        output_tokens, cost_micros, charged_micros
    )
    SELECT settled.tenant_id, (now() AT TIME ZONE 'UTC')::date, settled.model, settled.user_id,
        1, 1000::BIGINT, 200::BIGINT, :out::BIGINT, settled.cost_micros,
        settled.charged_micros
    FROM settled
    ON CONFLICT (tenant_id, day, model, user_id) DO UPDATE SET
        call_count = r.call_count + 1,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cost_micros = r.cost_micros + EXCLUDED.cost_micros,
        charged_micros = r.charged_micros + EXCLUDED.charged_micros
)
INSERT INTO usage_records (
    hold_id, request_id, request_fingerprint, tenant_id, user_id, model, input_tokens,
    cached_input_tokens, output_tokens, cost_micros, charged_micros, uncollected_micros,
    held_micros, payment_source, reserved_at, committed_at, available_after_micros
)
SELECT settled.hold_id, ('pgbc' || :run || '-' || :client_id || '-' || :seq)::VARCHAR,
    'e564560945364d3dfcf0f7087a04a3952e2eec098766d72b389770eb2e6c532d'::VARCHAR,
    settled.tenant_id, settled.user_id, settled.model, 1000::BIGINT, 200::BIGINT,
    :out::BIGINT, settled.cost_micros, settled.charged_micros,
    CASE WHEN settled.billing = 'metered'
        THEN settled.cost_micros - settled.charged_micros ELSE 0 END,
    settled.amount_micros,
    CASE WHEN settled.billing = 'metered' THEN 'credit' ELSE 'included' END,
    settled.created_at, now(), COALESCE(moved.available_micros, unchanged.available_micros)
FROM settled
LEFT JOIN moved ON moved.tenant_id = settled.tenant_id
LEFT JOIN unchanged ON unchanged.tenant_id = settled.tenant_id
RETURNING * \gset c_
