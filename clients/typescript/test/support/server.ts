// Real billing servers on real ports for the tests: the shared one tests/typescript starts
// (BILLING_TEST_TARGET), or child processes of `billing-service serve` a test starts itself.

import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const SERVING = /serving billing\.v1 on \S+ \(port (\d+)\)/;
const START_TIMEOUT_MS = 60_000;

/** A setting the test run must be given (tests/typescript sets them all). */
export function setting(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set: run these tests through \`pytest tests/typescript\``);
  }
  return value;
}

/** The address of the shared server: plain TCP, no authentication, no automatic tenants. */
export function sharedTarget(): string {
  return setting("BILLING_TEST_TARGET");
}

/** A directory of its own for this test file. */
export function scratchDirectory(): string {
  return mkdtempSync(join(tmpdir(), "billing-ts-test-"));
}

/** A port free right now (the server started on it fails loudly if it is taken meanwhile). */
export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  if (address === null || typeof address === "string") {
    throw new Error("no port");
  }
  return address.port;
}

/**
 * The settings of a server on a SQLite file in `directory`, with the test price table (one token
 * of any kind costs one micro: "unit-priced" is metered, "unit-included" included).
 */
export function sqliteSettings(directory: string, port = 0): Record<string, string> {
  return {
    BILLING_DATABASE_URL: `sqlite+aiosqlite:///${join(directory, "billing.db")}`,
    BILLING_LISTEN_ADDRESS: `127.0.0.1:${port}`,
    BILLING_PRICE_TABLE: setting("BILLING_TEST_PRICE_TABLE"),
    BILLING_AUTO_CREATE_TENANTS: "false",
    BILLING_EXPIRY_SWEEP_INTERVAL_S: "0.05",
    BILLING_LOG_FORMAT: "text",
  };
}

/** `billing-service serve` as a child process, ready once it logged its port. */
export class ServerProcess {
  readonly port: number;
  readonly log: string[];
  readonly #process: ChildProcess;

  private constructor(process: ChildProcess, port: number, log: string[]) {
    this.#process = process;
    this.port = port;
    this.log = log;
  }

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Starts a server with the given BILLING_* settings and waits until it listens. */
  static async start(settings: Record<string, string>): Promise<ServerProcess> {
    const [command, ...args] = JSON.parse(setting("BILLING_TEST_SERVE_COMMAND")) as string[];
    if (command === undefined) {
      throw new Error("BILLING_TEST_SERVE_COMMAND is empty");
    }
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([name]) => !name.startsWith("BILLING_")),
    );
    const child = spawn(command, args, {
      env: { ...env, ...settings },
      stdio: ["ignore", "ignore", "pipe"],
    });
    const log: string[] = [];
    const lines = createInterface({ input: child.stderr! });
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`the server did not start:\n${log.slice(-30).join("\n")}`));
      }, START_TIMEOUT_MS);
      lines.on("line", (line) => {
        log.push(line);
        const match = SERVING.exec(line);
        if (match?.[1] !== undefined) {
          clearTimeout(timer);
          resolve(Number(match[1]));
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`the server exited (${code}) before serving:\n${log.join("\n")}`));
      });
    });
    return new ServerProcess(child, port, log);
  }

  /** SIGTERM, then waits for the process to end; returns its exit code. */
  async stop(): Promise<number | null> {
    if (this.#process.exitCode !== null || this.#process.signalCode !== null) {
      return this.#process.exitCode;
    }
    const exited = once(this.#process, "exit");
    this.#process.kill("SIGTERM");
    const [code] = (await exited) as [number | null];
    return code;
  }

  kill(): void {
    if (this.#process.exitCode === null && this.#process.signalCode === null) {
      this.#process.kill("SIGKILL");
    }
  }
}
