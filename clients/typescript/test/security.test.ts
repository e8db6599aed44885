// TLS, mutual TLS and bearer tokens, as the server supports them, and the authentication
// reasons. The certificates come from tests/typescript (BILLING_TEST_TLS_DIR).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  BillingError,
  Code,
  ErrorReason,
  PermissionDenied,
  type TlsOptions,
  Unauthenticated,
} from "../src/index.js";
import { client, createTenant, tenantName } from "./support/billing.js";
import { ServerProcess, scratchDirectory, setting, sqliteSettings } from "./support/server.js";

const CHAT_TOKEN = "chat-token-0123456789abcdef";
const BACKEND_TOKEN = "backend-token-0123456789abcdef";
const OPERATOR_TOKEN = "operator-token-0123456789abcdef";

const certificates = setting("BILLING_TEST_TLS_DIR");
const pem = (name: string): Buffer => readFileSync(join(certificates, name));
const ca = pem("ca.crt");
const serverTls = {
  BILLING_TLS_CERT_FILE: join(certificates, "server.crt"),
  BILLING_TLS_KEY_FILE: join(certificates, "server.key"),
};

async function expectRefused(
  call: Promise<unknown>,
  type: typeof Unauthenticated | typeof PermissionDenied,
  code: Code,
  reason: ErrorReason,
): Promise<void> {
  await assert.rejects(call, (error: unknown) => {
    assert.ok(error instanceof type, String(error));
    assert.ok(error instanceof BillingError);
    assert.deepEqual([error.code, error.reason], [code, reason]);
    return true;
  });
}

describe("TLS with bearer tokens", () => {
  let server: ServerProcess;
  before(async () => {
    server = await ServerProcess.start({
      ...sqliteSettings(scratchDirectory()),
      ...serverTls,
      BILLING_AUTH_TOKENS: `chat-service=${CHAT_TOKEN}, product-backend=${BACKEND_TOKEN}, operator=${OPERATOR_TOKEN}`,
    });
  });
  after(() => server.kill());

  function over(options: { token?: string; tls?: TlsOptions }) {
    return client({ target: server.target, tls: { ca }, maxAttempts: 1, ...options });
  }

  test("the chat-service token may call BillingService over TLS", async (t) => {
    const operator = over({ token: OPERATOR_TOKEN });
    const chat = over({ token: CHAT_TOKEN });
    t.after(() => [operator, chat].forEach((c) => c.close()));
    const tenantId = tenantName("tls");
    await createTenant(operator, tenantId);
    const decision = await chat.checkAccess({ tenantId, model: "unit-priced" });
    assert.equal(decision.allowed, true);
  });

  test("CREDENTIALS_MISSING, TOKEN_INVALID, CALLER_NOT_PERMITTED", async (t) => {
    const none = over({});
    const wrong = over({ token: "not-a-known-token-at-all" });
    const backend = over({ token: BACKEND_TOKEN });
    t.after(() => [none, wrong, backend].forEach((c) => c.close()));
    const checkAccess = { tenantId: "acme", model: "unit-priced" };
    await expectRefused(
      none.checkAccess(checkAccess),
      Unauthenticated,
      Code.Unauthenticated,
      ErrorReason.CREDENTIALS_MISSING,
    );
    await expectRefused(
      wrong.checkAccess(checkAccess),
      Unauthenticated,
      Code.Unauthenticated,
      ErrorReason.TOKEN_INVALID,
    );
    await expectRefused(
      backend.checkAccess(checkAccess),
      PermissionDenied,
      Code.PermissionDenied,
      ErrorReason.CALLER_NOT_PERMITTED,
    );
  });

  test("an untrusted server certificate is refused before any call", async (t) => {
    const untrusting = client({
      target: server.target,
      tls: true,
      token: CHAT_TOKEN,
      maxAttempts: 1,
    });
    t.after(() => untrusting.close());
    await assert.rejects(
      untrusting.checkAccess({ tenantId: "acme", model: "unit-priced" }),
      BillingError,
    );
  });
});

describe("mutual TLS", () => {
  let server: ServerProcess;
  before(async () => {
    server = await ServerProcess.start({
      ...sqliteSettings(scratchDirectory()),
      ...serverTls,
      BILLING_TLS_CLIENT_CA_FILE: join(certificates, "ca.crt"),
      BILLING_TLS_CLIENT_ROLES: "chat-service=chat-1",
      BILLING_AUTH_TOKENS: `operator=${OPERATOR_TOKEN}`,
    });
  });
  after(() => server.kill());

  function withCertificate(name: string, token?: string) {
    const tls = { ca, cert: pem(`${name}.crt`), key: pem(`${name}.key`) };
    return client({
      target: server.target,
      tls,
      maxAttempts: 1,
      ...(token !== undefined && { token }),
    });
  }

  test("a client certificate of the chat-service role may call BillingService", async (t) => {
    const operator = withCertificate("stranger", OPERATOR_TOKEN);
    const chat = withCertificate("chat");
    t.after(() => [operator, chat].forEach((c) => c.close()));
    const tenantId = tenantName("mtls");
    await createTenant(operator, tenantId);
    const hold = await chat.reserve({
      tenantId,
      userId: "u",
      model: "unit-priced",
      inputTokens: 1,
      maxTokens: 1,
    });
    const record = await hold.commit({ inputTokens: 1, outputTokens: 1 });
    assert.equal(record.chargedMicros, 2n);
  });

  test("CLIENT_CERTIFICATE_UNKNOWN: a certificate naming no known caller", async (t) => {
    const stranger = withCertificate("stranger");
    t.after(() => stranger.close());
    await expectRefused(
      stranger.checkAccess({ tenantId: "acme", model: "unit-priced" }),
      Unauthenticated,
      Code.Unauthenticated,
      ErrorReason.CLIENT_CERTIFICATE_UNKNOWN,
    );
  });

  test("cert without key is refused when the client is made", () => {
    assert.throws(
      () => client({ target: server.target, tls: { ca, cert: pem("chat.crt") } }),
      /tls.cert and tls.key go together/,
    );
  });
});
