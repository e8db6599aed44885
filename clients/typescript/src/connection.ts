// The connection to the billing service: plain TCP or TLS (mutual TLS with a client
// certificate), a bearer token on every call, HTTP/2 keepalive.

import type { Interceptor, Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

/** PEM material for TLS. */
export interface TlsOptions {
  /** The CA certificates to trust; omitted: Node's default roots. */
  readonly ca?: string | Buffer | undefined;
  /** The client certificate chain, for mutual TLS (with `key`). */
  readonly cert?: string | Buffer | undefined;
  /** The client certificate's private key, for mutual TLS (with `cert`). */
  readonly key?: string | Buffer | undefined;
  /** The name to verify the server certificate against, when not the target's host. */
  readonly servername?: string | undefined;
}

export interface ConnectionOptions {
  /** "host:port" of the billing service, e.g. "localhost:50051". */
  readonly target: string;
  /**
   * Sent as `authorization: Bearer <token>` on every call, over TLS or plain TCP (a sidecar on
   * 127.0.0.1 is a supported setup).
   */
  readonly token?: string | undefined;
  /** TLS: `true` with the default roots, or the PEM material. Omitted or false: plain TCP. */
  readonly tls?: boolean | TlsOptions | undefined;
  /** Connect interceptors run on every call (tracing, logging), after the token is added. */
  readonly interceptors?: readonly Interceptor[] | undefined;
}

/**
 * Keepalive as the Python client's: a PING every 30 s, also on an idle connection (the server
 * admits one every 10 s), dead after 10 s without an answer.
 */
export const KEEPALIVE = {
  pingIntervalMs: 30_000,
  pingTimeoutMs: 10_000,
  pingIdleConnection: true,
} as const;

export interface Connection {
  readonly transport: Transport;
  /** Closes the HTTP/2 connection and any call still running on it. */
  close(): void;
}

/** A gRPC transport (Connect's, over Node's http2) to the billing service at `target`. */
export function connect(options: ConnectionOptions): Connection {
  if (!/^[^/:\s]+:\d+$|^\[[0-9a-fA-F:.]+\]:\d+$/.test(options.target)) {
    throw new TypeError(`target must be "host:port", not ${JSON.stringify(options.target)}`);
  }
  const tls = options.tls === true ? {} : options.tls || undefined;
  if (tls !== undefined && (tls.cert === undefined) !== (tls.key === undefined)) {
    throw new TypeError("tls.cert and tls.key go together (mutual TLS)");
  }
  const baseUrl = `${tls === undefined ? "http" : "https"}://${options.target}`;
  const nodeOptions =
    tls === undefined
      ? {}
      : {
          ...(tls.ca !== undefined && { ca: tls.ca }),
          ...(tls.cert !== undefined && { cert: tls.cert }),
          ...(tls.key !== undefined && { key: tls.key }),
          ...(tls.servername !== undefined && { servername: tls.servername }),
        };
  const sessionManager = new Http2SessionManager(baseUrl, KEEPALIVE, nodeOptions);
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined) {
    interceptors.push(bearerToken(options.token));
  }
  interceptors.push(...(options.interceptors ?? []));
  const transport = createGrpcTransport({ baseUrl, sessionManager, interceptors });
  return { transport, close: () => sessionManager.abort() };
}

/**
 * Adds `authorization: Bearer <token>` to every call. An interceptor, not channel credentials:
 * the token also goes over plain TCP to a sidecar on 127.0.0.1.
 */
export function bearerToken(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => (request) => {
    request.header.set("authorization", value);
    return next(request);
  };
}
