// The route while billing is unreachable: 503 for a metered model (fail closed, the model is
// not called), the answer unbilled for a model listed in CHAT_FAIL_OPEN_MODELS.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { once } from "node:events";
import { after, test } from "node:test";
import { chatRequest } from "./support.js";

// A port nothing listens on.
const probe = createServer().listen(0, "127.0.0.1");
await once(probe, "listening");
const address = probe.address();
assert.ok(address !== null && typeof address === "object");
probe.close();

process.env["CHAT_BILLING_TARGET"] = `127.0.0.1:${address.port}`;
process.env["CHAT_BILLING_ATTEMPTS"] = "2";
process.env["CHAT_BILLING_TIMEOUT_S"] = "0.2";
process.env["CHAT_FAIL_OPEN_MODELS"] = "unit-included";
const { POST } = await import("../app/api/chat/route.js");
const { chatApp } = await import("../lib/billing.js");
after(() => chatApp().billing.close());

test("503 with Retry-After for a metered model; the model is not called", async () => {
  const calls = chatApp().model.calls;
  const response = await POST(
    chatRequest({ tenant_id: "acme", user_id: "u", model: "unit-priced", prompt: "hi" }),
  );
  assert.equal(response.status, 503);
  assert.equal(response.headers.get("retry-after"), "5");
  assert.deepEqual(await response.json(), {
    error: { reason: "BILLING_UNAVAILABLE", message: "Billing is unavailable; try again shortly." },
  });
  assert.equal(chatApp().model.calls, calls);
});

test("a fail-open model is answered, unbilled", async () => {
  const response = await POST(
    chatRequest({ tenant_id: "acme", user_id: "u", model: "unit-included", prompt: "hi there" }),
  );
  assert.equal(response.status, 200);
  const body = await response.json();
  assert.equal(body.text, "You said: hi there");
  assert.equal(body.billing.committed, false);
});
