/**
 * forkvm: run untrusted code in hardware-isolated KVM sandboxes forked in microseconds.
 *
 *     import { Sandbox } from "@forkvm/sdk";
 *     const result = await new Sandbox("fvk_...").run("print(1 + 1)");
 *     console.log(result.stdout); // "2\n"
 *
 * No runtime dependencies: the platform's `fetch` (Node 18+, browsers, Deno, Bun).
 */

const DEFAULT_URL = "http://127.0.0.1:8080";
/** Milliseconds a call may take beyond the code's own time limit. */
const SLACK_MS = 30_000;
const DEFAULT_TIMEOUT_MS = 60_000;
const DEFAULT_RETRIES = 3;

declare const process: { env: Record<string, string | undefined> } | undefined;

function env(name: string): string | undefined {
  return typeof process !== "undefined" ? process.env[name] : undefined;
}

// ---- errors -----------------------------------------------------------------------

/** An error the server answered with, or a failed call. `kind` is the API's error kind. */
export class ForkvmError extends Error {
  readonly kind: string;
  readonly status: number;
  readonly field?: string;
  constructor(message: string, kind = "error", status = 0, field?: string) {
    super(message);
    this.name = new.target.name;
    this.kind = kind;
    this.status = status;
    this.field = field;
  }
}
/** 401: the API key is missing or unknown. */
export class AuthenticationError extends ForkvmError {}
/** 404: no such session (for this key), file or route. */
export class NotFoundError extends ForkvmError {}
/** 400, 408, 413, 422: the request was refused as it was; `field` names the culprit. */
export class InvalidRequestError extends ForkvmError {}
/** 409: the session cannot do that now. */
export class ConflictError extends ForkvmError {}
/** 429: rate or quota reached; `retryAfter` is in seconds. */
export class RateLimitError extends ForkvmError {
  readonly retryAfter?: number;
  constructor(message: string, kind: string, status: number, field?: string, retryAfter?: number) {
    super(message, kind, status, field);
    this.retryAfter = retryAfter;
  }
}
/** 5xx: a fault of the server's. */
export class ServerError extends ForkvmError {}
/** 503: the server cannot take the request now. */
export class UnavailableError extends ServerError {}
/** No answer in time (the code's own limit is not an error: see `Execution.error`). */
export class TimeoutError extends ForkvmError {}

function errorFrom(status: number, body: unknown, retryAfter: string | null): ForkvmError {
  const detail = (body as { error?: { kind?: string; message?: string; field?: string } })?.error ?? {};
  const kind = detail.kind ?? "error";
  const message = detail.message ?? (typeof body === "string" && body ? body : `HTTP ${status}`);
  const field = detail.field ?? undefined;
  if (status === 401) return new AuthenticationError(message, kind, status, field);
  if (status === 404) return new NotFoundError(message, kind, status, field);
  if (status === 409) return new ConflictError(message, kind, status, field);
  if (status === 429) {
    const seconds = retryAfter === null ? undefined : Number(retryAfter);
    return new RateLimitError(message, kind, status, field, Number.isFinite(seconds) ? seconds : undefined);
  }
  if (status === 503) return new UnavailableError(message, kind, status, field);
  if (status >= 500) return new ServerError(message, kind, status, field);
  if (status >= 400) return new InvalidRequestError(message, kind, status, field);
  return new ForkvmError(message, kind, status, field);
}

// ---- results ----------------------------------------------------------------------

/** Why an execution ended other than by finishing: `timeout`, `memory_limit`, … */
export interface ExecutionError {
  kind: string;
  message: string;
}

/** How some code ran. */
export interface Execution {
  id: string;
  stdout: string;
  stderr: string;
  exitCode: number;
  /** `null` when the code ran to its end (whatever its exit code). */
  error: ExecutionError | null;
  timings: { forkMs: number; execMs: number; totalMs: number; queueMs: number };
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  /** The code ran to its end and exited 0. */
  ok: boolean;
}

/** A session as `Sandbox.list()` sees it. */
export interface SessionInfo {
  id: string;
  template: string;
  alive: boolean;
  memoryBytes: number;
  createdAt: number;
  lastUsedAt: number;
  expiresAt: number;
  ttlSeconds: number;
  metadata: Record<string, string>;
  /** `running` (it has a VM) or `paused` (stored on disk; any call resumes it). */
  state: "running" | "paused";
  /** Bytes its paused state takes on disk (0 while running). */
  storedBytes: number;
}

/** An event of a streamed run. */
export type StreamEvent =
  | { type: "stdout"; data: string }
  | { type: "stderr"; data: string }
  | { type: "result"; execution: Execution };

// deno-lint-ignore no-explicit-any
type Json = any;

function executionFrom(data: Json): Execution {
  const kind: string = data?.error?.kind ?? "none";
  const error = kind === "none" ? null : { kind, message: data?.error?.message ?? "" };
  const exitCode = Number(data?.exit_code ?? -1);
  return {
    id: String(data?.id ?? ""),
    stdout: data?.stdout ?? "",
    stderr: data?.stderr ?? "",
    exitCode,
    error,
    timings: {
      forkMs: Number(data?.fork_time_ms ?? 0),
      execMs: Number(data?.exec_time_ms ?? 0),
      totalMs: Number(data?.total_time_ms ?? 0),
      queueMs: Number(data?.queue_time_ms ?? 0),
    },
    stdoutTruncated: Boolean(data?.stdout_truncated),
    stderrTruncated: Boolean(data?.stderr_truncated),
    ok: error === null && exitCode === 0,
  };
}

function sessionFrom(data: Json): SessionInfo {
  return {
    id: String(data.id),
    template: data.template ?? "",
    alive: data.alive ?? true,
    memoryBytes: Number(data.memory_bytes ?? 0),
    createdAt: Number(data.created_at ?? 0),
    lastUsedAt: Number(data.last_used_at ?? 0),
    expiresAt: Number(data.expires_at ?? 0),
    ttlSeconds: Number(data.ttl_seconds ?? 0),
    metadata: data.metadata ?? {},
    state: data.state === "paused" ? "paused" : "running",
    storedBytes: Number(data.stored_bytes ?? 0),
  };
}

// ---- requests ---------------------------------------------------------------------

export interface SandboxOptions {
  /** Default: `FORKVM_URL`, else http://127.0.0.1:8080. */
  baseUrl?: string;
  /** Milliseconds a call that runs no code may take (default 60 s). */
  timeoutMs?: number;
  /** Retries of 429 and 503 answers, honouring Retry-After (default 3). */
  maxRetries?: number;
}

export interface RunOptions {
  /**
   * `javascript`, `typescript`, `python`, `bash`... A run outside a session defaults to
   * `javascript` (unless it names a template); a session runs its template's language.
   */
  language?: string;
  /** One of the server's templates (default: the first that runs `language`). */
  template?: string;
  /** The code's wall-clock limit, in seconds. */
  timeout?: number;
  env?: Record<string, string>;
  stdin?: string;
  /** Files placed before the code runs: text, or bytes. */
  files?: Record<string, string | Uint8Array>;
  cwd?: string;
  memoryMb?: number;
  outputLimitBytes?: number;
  /** Output as it is written (the run then streams). */
  onStdout?: (chunk: string) => void;
  onStderr?: (chunk: string) => void;
}

export interface CommandOptions {
  timeout?: number;
  env?: Record<string, string>;
  stdin?: string;
  cwd?: string;
  onStdout?: (chunk: string) => void;
  onStderr?: (chunk: string) => void;
}

function base64(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

function execBody(code: string, o: RunOptions = {}, inSession = false): Json {
  const body: Json = { code };
  if (o.language !== undefined) body.language = o.language;
  else if (!inSession && o.template === undefined) body.language = "javascript";
  if (o.template !== undefined) body.template = o.template;
  if (o.timeout !== undefined) body.timeout_seconds = o.timeout;
  if (o.env) body.env = o.env;
  if (o.stdin !== undefined) body.stdin = o.stdin;
  if (o.cwd !== undefined) body.cwd = o.cwd;
  if (o.memoryMb !== undefined) body.memory_mb = o.memoryMb;
  if (o.outputLimitBytes !== undefined) body.output_limit_bytes = o.outputLimitBytes;
  if (o.files) {
    body.files = Object.entries(o.files).map(([path, content]) =>
      typeof content === "string" ? { path, content } : { path, content_base64: base64(content) },
    );
  }
  return body;
}

interface Settings {
  apiKey?: string;
  baseUrl: string;
  timeoutMs: number;
  maxRetries: number;
}

function settingsOf(apiKey?: string, options: SandboxOptions = {}): Settings {
  return {
    apiKey: apiKey ?? env("FORKVM_API_KEY"),
    baseUrl: (options.baseUrl ?? env("FORKVM_URL") ?? DEFAULT_URL).replace(/\/+$/, ""),
    timeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    maxRetries: options.maxRetries ?? DEFAULT_RETRIES,
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** One call, retried on 429 and 503; an error answer is thrown. */
async function call(
  settings: Settings,
  method: string,
  path: string,
  body?: Json | Uint8Array | string,
  timeoutMs = settings.timeoutMs,
): Promise<Response> {
  const headers: Record<string, string> = {};
  if (settings.apiKey) headers.authorization = `Bearer ${settings.apiKey}`;
  let payload: BodyInit | undefined;
  if (body instanceof Uint8Array || typeof body === "string") {
    payload = body as BodyInit;
  } else if (body !== undefined) {
    headers["content-type"] = "application/json";
    payload = JSON.stringify(body);
  }
  for (let attempt = 0; ; attempt++) {
    let response: Response;
    try {
      response = await fetch(settings.baseUrl + path, {
        method,
        headers,
        body: payload,
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (e) {
      const name = (e as Error)?.name;
      if (name === "TimeoutError" || name === "AbortError") {
        throw new TimeoutError(`no answer within ${timeoutMs} ms`, "timeout");
      }
      throw new ForkvmError(`cannot reach the server: ${(e as Error)?.message ?? e}`, "connection");
    }
    if (response.ok) return response;
    const text = await response.text();
    let parsed: Json = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    const error = errorFrom(response.status, parsed, response.headers.get("retry-after"));
    const retryable = error instanceof RateLimitError || error instanceof UnavailableError;
    if (!retryable || attempt >= settings.maxRetries) throw error;
    const after = (error as RateLimitError).retryAfter;
    await sleep(after !== undefined ? Math.min(after, 30) * 1000 : Math.min(250 * 2 ** attempt, 8000));
  }
}

/** Server-Sent Events of a streaming response. */
async function* events(response: Response): AsyncGenerator<{ event: string; data: string }> {
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data: string[] = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline: number;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) yield { event, data: data.join("\n") };
        event = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? "" : line.slice(colon + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (name === "event") event = v;
        else if (name === "data") data.push(v);
      }
    }
  }
}

// ---- the sandbox ------------------------------------------------------------------

/**
 * A forkvm sandbox. `new Sandbox(key).run(code)` runs code in a fresh sandbox each time;
 * `await Sandbox.create()` makes a session that keeps its state, can be forked, and is
 * deleted by `kill()`.
 */
export class Sandbox {
  /** The session's id; `null` for a sandbox that runs each request fresh. */
  id: string | null;
  readonly files: Files;
  readonly commands: Commands;
  private readonly settings: Settings;

  constructor(apiKey?: string, options: SandboxOptions = {}, sessionId: string | null = null) {
    this.settings = settingsOf(apiKey, options);
    this.id = sessionId;
    this.files = new Files(this);
    this.commands = new Commands(this);
  }

  /** A new session (a fork of `template`, idle for at most `ttl` seconds). */
  static async create(
    options: SandboxOptions & {
      apiKey?: string;
      template?: string;
      ttl?: number;
      metadata?: Record<string, string>;
    } = {},
  ): Promise<Sandbox> {
    const sandbox = new Sandbox(options.apiKey, options);
    const body: Json = {};
    if (options.template !== undefined) body.template = options.template;
    if (options.ttl !== undefined) body.ttl_seconds = options.ttl;
    if (options.metadata) body.metadata = options.metadata;
    const info = await (await call(sandbox.settings, "POST", "/v1/sandboxes", body)).json();
    sandbox.id = String(info.id);
    return sandbox;
  }

  /** The session `sessionId` (made earlier, perhaps elsewhere), checked to exist. */
  static async connect(sessionId: string, options: SandboxOptions & { apiKey?: string } = {}): Promise<Sandbox> {
    const sandbox = new Sandbox(options.apiKey, options, sessionId);
    await sandbox.info();
    return sandbox;
  }

  /** The key's live sessions. */
  static async list(options: SandboxOptions & { apiKey?: string } = {}): Promise<SessionInfo[]> {
    const settings = settingsOf(options.apiKey, options);
    const data = await (await call(settings, "GET", "/v1/sandboxes")).json();
    return (data.sandboxes ?? []).map(sessionFrom);
  }

  /** Runs `code` and returns how it ran. */
  async run(code: string, options: RunOptions = {}): Promise<Execution> {
    if (options.onStdout || options.onStderr) {
      let result: Execution | undefined;
      for await (const event of this.stream(code, options)) {
        if (event.type === "stdout") options.onStdout?.(event.data);
        else if (event.type === "stderr") options.onStderr?.(event.data);
        else result = event.execution;
      }
      return result!;
    }
    const body = execBody(code, options, this.id !== null);
    const response = await call(this.settings, "POST", this.execPath(), body, this.callTimeout(options.timeout));
    return executionFrom(await response.json());
  }

  /** Runs `code`, yielding its output as it is written, then its result. */
  async *stream(code: string, options: RunOptions = {}): AsyncGenerator<StreamEvent> {
    const body = { ...execBody(code, options, this.id !== null), stream: true };
    yield* this.streamFrom(this.execPath(), body, options.timeout);
  }

  /** Runs several snippets at once, each in its own fresh sandbox. */
  async runBatch(items: Array<string | ({ code: string } & RunOptions)>): Promise<Execution[]> {
    const executions = items.map((item) => (typeof item === "string" ? execBody(item) : execBody(item.code, item)));
    const longest = Math.max(30, ...executions.map((e: Json) => e.timeout_seconds ?? 30));
    const response = await call(this.settings, "POST", "/v1/exec/batch", { executions }, this.callTimeout(longest));
    return (await response.json()).results.map(executionFrom);
  }

  /** `n` new sessions that start from this one's exact state. */
  async fork(n = 1): Promise<Sandbox[]> {
    const data = await (await call(this.settings, "POST", this.sessionPath("/fork"), { count: n })).json();
    return data.ids.map((id: string) => new Sandbox(this.settings.apiKey, this.settings, String(id)));
  }

  /** This session as the server sees it now. */
  async info(): Promise<SessionInfo> {
    return sessionFrom(await (await call(this.settings, "GET", this.sessionPath())).json());
  }

  /**
   * Stores the session's complete state on the server's disk and frees its VM. It survives
   * server restarts; the next call (or `resume`) brings it back as it was.
   */
  async pause(): Promise<SessionInfo> {
    return sessionFrom(await (await call(this.settings, "POST", this.sessionPath("/pause"))).json());
  }

  /** Brings a paused session back now (any call would); running: nothing to do. */
  async resume(): Promise<SessionInfo> {
    return sessionFrom(await (await call(this.settings, "POST", this.sessionPath("/resume"))).json());
  }

  /** Deletes the session and everything in it (a session already gone is fine). */
  async kill(): Promise<void> {
    if (this.id === null) return;
    try {
      await call(this.settings, "DELETE", this.sessionPath());
    } catch (e) {
      if (!(e instanceof NotFoundError)) throw e;
    }
  }

  /** @internal */
  sessionPath(rest = ""): string {
    if (this.id === null) throw new ForkvmError("this Sandbox is not a session: use Sandbox.create()");
    return `/v1/sandboxes/${this.id}${rest}`;
  }

  /** @internal */
  async request(method: string, path: string, body?: Json | Uint8Array | string, timeoutMs?: number): Promise<Response> {
    return call(this.settings, method, path, body, timeoutMs);
  }

  /** @internal */
  callTimeout(codeTimeout?: number): number {
    return Math.max(this.settings.timeoutMs, (codeTimeout ?? 30) * 1000 + SLACK_MS);
  }

  /** @internal */
  async *streamFrom(path: string, body: Json, codeTimeout?: number): AsyncGenerator<StreamEvent> {
    const response = await call(this.settings, "POST", path, body, this.callTimeout(codeTimeout));
    for await (const { event, data } of events(response)) {
      if (event === "stdout" || event === "stderr") {
        yield { type: event, data: JSON.parse(data) };
      } else if (event === "result") {
        yield { type: "result", execution: executionFrom(JSON.parse(data)) };
        return;
      } else if (event === "error") {
        throw errorFrom(500, JSON.parse(data), null);
      }
    }
    throw new ForkvmError("the event stream ended without a result");
  }

  private execPath(): string {
    return this.id === null ? "/v1/exec" : this.sessionPath("/exec");
  }
}

/** A session's files. */
export class Files {
  constructor(private readonly sandbox: Sandbox) {}

  private path(path: string): string {
    const encoded = path.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/");
    return this.sandbox.sessionPath(`/files/${encoded}`);
  }

  /** Writes `data` (text is UTF-8) to `path` in the session. */
  async write(path: string, data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    await this.sandbox.request("PUT", this.path(path), bytes);
  }

  /** The bytes of `path` in the session. */
  async read(path: string): Promise<Uint8Array> {
    const response = await this.sandbox.request("GET", this.path(path));
    return new Uint8Array(await response.arrayBuffer());
  }
}

/** Shell commands in a session. */
export class Commands {
  constructor(private readonly sandbox: Sandbox) {}

  /** Runs the command line with `bash -c` in the session. */
  async run(cmd: string, options: CommandOptions = {}): Promise<Execution> {
    const body: Json = { cmd };
    if (options.timeout !== undefined) body.timeout_seconds = options.timeout;
    if (options.env) body.env = options.env;
    if (options.stdin !== undefined) body.stdin = options.stdin;
    if (options.cwd !== undefined) body.cwd = options.cwd;
    const path = this.sandbox.sessionPath("/commands");
    if (options.onStdout || options.onStderr) {
      let result: Execution | undefined;
      for await (const event of this.sandbox.streamFrom(path, { ...body, stream: true }, options.timeout)) {
        if (event.type === "stdout") options.onStdout?.(event.data);
        else if (event.type === "stderr") options.onStderr?.(event.data);
        else result = event.execution;
      }
      return result!;
    }
    const response = await this.sandbox.request("POST", path, body, this.sandbox.callTimeout(options.timeout));
    return executionFrom(await response.json());
  }
}
