// The API client of the dashboard: JSON reads, mutations with the bearer token, and readable errors.

const TOKEN_KEY = "icd.token";

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY) || "",
  set: (value) => (value ? localStorage.setItem(TOKEN_KEY, value) : localStorage.removeItem(TOKEN_KEY)),
};

/** An API error: `fields` holds [{field, msg}] for a 422, `message` one readable line. */
export class ApiError extends Error {
  constructor(status, detail) {
    const fields = Array.isArray(detail) ? detail.map((d) => ({ field: d.field ?? (d.loc || []).join("."), msg: d.msg })) : [];
    const text = fields.length ? fields.map((f) => `${f.field || "(body)"}: ${f.msg}`).join("; ") : String(detail ?? "");
    super(`HTTP ${status}: ${text}`);
    this.status = status;
    this.fields = fields;
  }
}

export const bytesReceived = { total: 0 }; // read by the performance benchmark

async function request(method, url, { body, contentType, raw } = {}) {
  const headers = {};
  const t = token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  if (body !== undefined) headers["Content-Type"] = contentType || "application/json";
  const init = { method, headers };
  if (body !== undefined) init.body = contentType ? body : JSON.stringify(body);
  const r = await fetch(url, init);
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch { /* not JSON */ }
    if (r.status === 401) detail = `${detail} (set the API token at the top right)`;
    throw new ApiError(r.status, detail);
  }
  if (raw) return r;
  if (r.status === 204) return null;
  const text = await r.text();
  bytesReceived.total += text.length;
  return JSON.parse(text);
}

export const api = {
  get: (url) => request("GET", url),
  post: (url, body, contentType) => request("POST", url, { body, contentType }),
  del: (url) => request("DELETE", url),
  async text(url) {
    const r = await request("GET", url, { raw: true });
    const text = await r.text();
    bytesReceived.total += text.length;
    return { text, offset: Number(r.headers.get("X-Log-Offset") ?? 0) };
  },
};
