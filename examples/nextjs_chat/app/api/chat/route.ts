// The chat route of the Next.js App Router app (app/api/chat/route.ts), billed: see lib/chat.ts.

import { chatApp } from "../../../lib/billing.js";
import { handleChat } from "../../../lib/chat.js";

// The billing client speaks gRPC over Node's http2: the Node.js runtime, not the Edge runtime.
export const runtime = "nodejs";

export async function POST(req: Request): Promise<Response> {
  return handleChat(req, chatApp());
}
