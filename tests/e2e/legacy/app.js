'use strict'
/*
 * A stand-in for the legacy Chat API (direct_llm), on the product's own Express stack: `cors`
 * with the product's options (origin from CORS_ORIGIN, default '*'), `compression()` (which
 * compresses whenever the request accepts it), a per-IP rate limit (express-rate-limit) that
 * believes X-Forwarded-For only from a trusted hop (`trust proxy`), then the routes.
 *
 * The two chat routes stream Agent2UI `event: message` text frames and an `event: done`, one
 * write an event with no flush, as the product's chat service writes them: compressed, the whole
 * answer waits in the compressor until the end. Ids and timestamps derive from the session id and
 * the message, so a test can compare the bytes its client got with `legacy_stream()`
 * (legacy_stream.py) byte for byte. Every other route echoes what it received (method, path,
 * query, headers, body size and hash). Chat requests are recorded: GET /control/received. A chat
 * in a session of the caller's org saves the user's message and the answer, as the product does. The
 * message "legacy:hold" makes the stream wait after its first event until
 * POST /control/release/{session_id}.
 *
 * The conversation bridge's routes answer the way the source product's API does: sessions, agents
 * and messages in memory, `{"success":true,"data":...}`, scoped by the org of the caller's JWT
 * (another org's session or agent is a 404, no valid token a 401), the agent's `config` as a JSON
 * string as its database stores it. Test helpers (not part of the real API, and not rate-limited):
 *   POST /control/seed          {org, agent?: {id,name,systemPrompt,config}, session?: {id,agentId},
 *                               messages?: [{role,content}]} stores them
 *   POST /control/fault         {route, id, status?, hang?, times?}: the route misbehaves for calls
 *                               naming that session or agent id (routes: get_session, get_agent,
 *                               get_messages, post_message, create_session, delete_session)
 *   GET  /control/bridge        every bridge call: seq, route, method, path, headers, body (and the
 *                               `created` session id); chat requests carry `seq` too
 *   GET  /control/limited       every request the rate limit saw: its key (the client IP Express
 *                               settled on) and whether it was refused
 * A request carrying `x-echo-status` is echoed whatever its path, so pass-through tests can aim
 * at any route, bridge routes included.
 *
 * Environment: PORT, LEGACY_JWT_SECRET, LEGACY_EVENT_GAP_MS (between a chat answer's events,
 * default 2), CORS_ORIGIN (unset: '*'), RATE_LIMIT_PER_MINUTE
 * (default 60, the product's), TRUST_PROXY (Express `trust proxy`; default 1: the one hop in
 * front, the sidecar).
 */

const crypto = require('crypto')
const express = require('express')
const cors = require('cors')
const compression = require('compression')
const { rateLimit } = require('express-rate-limit')
const jwt = require('jsonwebtoken')

const JWT_SECRET = process.env.LEGACY_JWT_SECRET || ''
// Between a chat answer's events (the LLM's pace); the benchmark slows it down.
const EVENT_GAP_MS = parseInt(process.env.LEGACY_EVENT_GAP_MS || '2', 10)
const RECEIVED = []
const RELEASES = new Map() // session id -> {promise, release}
const SESSIONS = new Map()
const AGENTS = new Map()
const MESSAGES = new Map()
const BRIDGE_CALLS = []
const FAULTS = new Map() // `${route}|${id}` -> {status, hang, times}
const LIMITED = []
let ids = 1
let seq = 1

// ---- the chat answer --------------------------------------------------------------------------

const answerWords = (message) => ['Legacy', ' answer', ' to: ', message, ' 你好']
const answerText = (message) => answerWords(message).join('')

/** The SSE body of a legacy chat answer, as the writes the legacy API makes. */
function legacyChunks (sessionId, message) {
  const digest = crypto.createHash('sha1').update(`${sessionId}|${message}`, 'utf8').digest('hex').slice(0, 12)
  const words = answerWords(message)
  const chunks = words.map((word, i) => {
    const msg = {
      id: `legacy-${digest}-${i}`,
      type: 'text',
      data: { content: word },
      timestamp: `2024-05-01T12:00:0${i}.000Z`
    }
    return `event: message\ndata: ${JSON.stringify(msg)}\n\n`
  })
  const done = { sessionId, messageId: `legacy-${digest}`, executionMode: 'direct_llm' }
  chunks.push(`event: done\ndata: ${JSON.stringify(done)}\n\n`)
  return chunks
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function releaseOf (sessionId) {
  if (!RELEASES.has(sessionId)) {
    let release
    const promise = new Promise((resolve) => { release = resolve })
    RELEASES.set(sessionId, { promise, release })
  }
  return RELEASES.get(sessionId)
}

function parseJson (raw) {
  try {
    return raw && raw.length ? JSON.parse(raw.toString('utf8')) : null
  } catch (e) {
    return null
  }
}

/** What a rate limit of the product sets on a chat answer (its per-user limits, exposed by cors). */
function rateLimitHeaders (res) {
  res.setHeader('X-RateLimit-Limit', 60)
  res.setHeader('X-RateLimit-Remaining', 59)
  res.setHeader('X-RateLimit-Reset', Math.ceil(Date.now() / 1000) + 60)
}

async function chat (req, res, sessionId) {
  const raw = req.body
  const body = parseJson(raw)
  RECEIVED.push({
    seq: seq++,
    path: req.path,
    query: req.url.includes('?') ? req.url.slice(req.url.indexOf('?') + 1) : '',
    headers: req.headers,
    body,
    raw_len: raw.length
  })
  const message = body && typeof body === 'object' && typeof body.message === 'string' ? body.message : ''
  // As the product's chat service does: a chat in a session the caller's org owns saves the
  // user's message before answering and the answer before `done`, under the id `done` names.
  const owned = SESSIONS.get(sessionId)
  const saving = owned && owned.orgId === callerOrg(req) ? MESSAGES.get(sessionId) : null
  if (saving) {
    saving.push({
      id: `msg-${ids++}`, sessionId, role: 'user', content: message, parentId: (body && body.parentMessageId) || null, metadata: null, createdAt: nowIso()
    })
  }
  rateLimitHeaders(res)
  res.setHeader('Content-Type', 'text/event-stream')
  res.setHeader('Cache-Control', 'no-cache')
  res.setHeader('Connection', 'keep-alive')
  res.setHeader('X-Accel-Buffering', 'no')
  res.setHeader('x-legacy', '1')
  res.status(200)
  const chunks = legacyChunks(sessionId, message)
  for (let i = 0; i < chunks.length; i++) {
    if (saving && i === chunks.length - 1) {
      const done = JSON.parse(chunks[i].slice(chunks[i].indexOf('data: ') + 6))
      saving.push({
        id: done.messageId, sessionId, role: 'assistant', content: answerText(message), parentId: null, metadata: null, createdAt: nowIso()
      })
    }
    res.write(chunks[i])
    if (i === 0 && message === 'legacy:hold') {
      // Hold the rest until the test says so (proves the proxy streams legacy too).
      await Promise.race([releaseOf(sessionId).promise, sleep(30000)])
    }
    await sleep(EVENT_GAP_MS)
  }
  res.end()
}

// ---- the conversation bridge's routes ---------------------------------------------------------

const nowIso = () => new Date().toISOString()
const ok = (res, data, status = 200) => res.status(status).json({ success: true, data })
const failure = (res, status, code, message) => res.status(status).json({ success: false, error: { code, message } })
const notFound = (res, what) => failure(res, 404, 'NOT_FOUND', `${what} not found`)

/** The org of a valid bearer token (HS256, expiry checked), as the Chat API's auth does. */
function callerOrg (req) {
  const header = req.headers.authorization || ''
  if (!header.startsWith('Bearer ') || !JWT_SECRET) return null
  try {
    const claims = jwt.verify(header.slice('Bearer '.length), JWT_SECRET, { algorithms: ['HS256'] })
    const org = claims.orgId
    return typeof org === 'string' && org ? org : null
  } catch (e) {
    return null
  }
}

/** Record the call, then apply a fault set for (route, key): {org, body} or an answer sent. */
async function bridgeCall (req, res, route, key) {
  const body = parseJson(req.body)
  const call = { seq: seq++, route, method: req.method, path: req.path, headers: req.headers, body }
  BRIDGE_CALLS.push(call)
  res.locals.call = call
  const faultKey = `${route}|${key}`
  const fault = FAULTS.get(faultKey)
  if (fault) {
    if (fault.times !== null && fault.times !== undefined) {
      fault.times -= 1
      if (fault.times <= 0) FAULTS.delete(faultKey)
    }
    if (fault.hang) {
      await sleep(3600 * 1000)
    }
    failure(res, fault.status || 500, 'INJECTED', 'injected fault')
    return null
  }
  const org = callerOrg(req)
  if (org === null) {
    failure(res, 401, 'UNAUTHORIZED', 'missing or invalid token')
    return null
  }
  return { org, body }
}

function ownSession (sessionId, org) {
  const s = SESSIONS.get(sessionId)
  return s && s.orgId === org ? s : null
}

function echo (req, res) {
  const raw = req.body
  const status = parseInt(req.headers['x-echo-status'] || '200', 10)
  res.setHeader('x-legacy', '1')
  res.status(status).json({
    method: req.method,
    path: req.path,
    query: req.url.includes('?') ? req.url.slice(req.url.indexOf('?') + 1) : '',
    headers: req.headers,
    body_len: raw.length,
    body_sha256: crypto.createHash('sha256').update(raw).digest('hex')
  })
}

/** A bridge route, unless the request asks to be echoed. */
const bridged = (handler) => (req, res, next) => {
  if ('x-echo-status' in req.headers) return echo(req, res)
  handler(req, res).catch(next)
}

// ---- the app ----------------------------------------------------------------------------------

const app = express()
app.disable('x-powered-by')
const trust = process.env.TRUST_PROXY ?? '1'
app.set('trust proxy', /^\d+$/.test(trust) ? parseInt(trust, 10) : trust)

// The product's middleware, in the product's order.
app.use(cors({
  origin: process.env.CORS_ORIGIN ?? '*',
  credentials: true,
  methods: ['GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'],
  allowedHeaders: ['Content-Type', 'Authorization', 'X-Request-ID'],
  exposedHeaders: ['X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset']
}))
app.use(compression())
// Raw bodies: the stand-in records sizes and hashes, and parses JSON itself.
app.use(express.raw({ type: () => true, limit: '10mb' }))
app.use((req, res, next) => {
  if (!Buffer.isBuffer(req.body)) req.body = Buffer.alloc(0)
  next()
})

// ---- test controls (before the rate limit: they are not the API's traffic) --------------------

app.post('/control/seed', (req, res) => {
  const spec = parseJson(req.body)
  const org = spec.org
  if (spec.agent) {
    const a = spec.agent
    AGENTS.set(a.id, { id: a.id, orgId: org, name: a.name || '', systemPrompt: a.systemPrompt || '', config: a.config || {} })
  }
  if (spec.session) {
    const s = spec.session
    SESSIONS.set(s.id, { id: s.id, orgId: org, agentId: s.agentId, title: s.title || '', createdAt: nowIso() })
    MESSAGES.set(s.id, (spec.messages || []).map((m) => ({
      id: `msg-${ids++}`, sessionId: s.id, role: m.role, content: m.content, parentId: null, metadata: null, createdAt: nowIso()
    })))
  }
  res.json({ seeded: true })
})

app.post('/control/fault', (req, res) => {
  const spec = parseJson(req.body)
  FAULTS.set(`${spec.route}|${spec.id}`, { status: spec.status ?? null, hang: Boolean(spec.hang), times: spec.times ?? null })
  res.json({ fault: spec })
})

app.get('/control/bridge', (req, res) => res.json(BRIDGE_CALLS))
app.get('/control/sessions/:id', (req, res) => res.json({ session: SESSIONS.get(req.params.id) || null }))
app.post('/control/release/:id', (req, res) => {
  releaseOf(req.params.id).release()
  res.json({ released: req.params.id })
})
app.get('/control/received', (req, res) => res.json(RECEIVED))
app.get('/control/limited', (req, res) => res.json(LIMITED))

// The product's general limit: per client IP (`req.ip`, which `trust proxy` derives from
// X-Forwarded-For), standard draft-7 headers.
app.use(rateLimit({
  windowMs: 60 * 1000,
  limit: parseInt(process.env.RATE_LIMIT_PER_MINUTE || '60', 10),
  standardHeaders: 'draft-7',
  legacyHeaders: false,
  handler: (req, res, next, options) => {
    LIMITED.push({ key: req.ip, refused: true })
    res.status(options.statusCode).json({
      success: false,
      error: { code: 'RATE_LIMIT_EXCEEDED', message: 'too many requests' }
    })
  }
}))
app.use((req, res, next) => {
  LIMITED.push({ key: req.ip, refused: false })
  next()
})

app.post('/api/v1/chat/sessions/:sessionId', (req, res, next) => {
  chat(req, res, req.params.sessionId).catch(next)
})
app.post('/api/v1/chat/start', (req, res, next) => {
  chat(req, res, 'legacy-new-session').catch(next)
})

app.get('/api/v1/sessions/:id', bridged(async (req, res) => {
  const got = await bridgeCall(req, res, 'get_session', req.params.id)
  if (!got) return
  const s = ownSession(req.params.id, got.org)
  s ? ok(res, s) : notFound(res, 'session')
}))

app.delete('/api/v1/sessions/:id', bridged(async (req, res) => {
  const got = await bridgeCall(req, res, 'delete_session', req.params.id)
  if (!got) return
  if (!ownSession(req.params.id, got.org)) return notFound(res, 'session')
  SESSIONS.delete(req.params.id)
  MESSAGES.delete(req.params.id)
  ok(res, { id: req.params.id })
}))

app.post('/api/v1/sessions', bridged(async (req, res) => {
  const parsed = parseJson(req.body)
  const agentId = parsed && typeof parsed === 'object' && parsed.agentId ? String(parsed.agentId) : ''
  const got = await bridgeCall(req, res, 'create_session', agentId)
  if (!got) return
  const agent = AGENTS.get(agentId)
  if (!agent || agent.orgId !== got.org) return notFound(res, 'agent')
  const sessionId = `sess-legacy-${ids++}`
  const title = (got.body && got.body.title) || ''
  SESSIONS.set(sessionId, { id: sessionId, orgId: got.org, agentId, title, createdAt: nowIso() })
  MESSAGES.set(sessionId, [])
  res.locals.call.created = sessionId
  ok(res, { id: sessionId, agentId, title }, 201)
}))

app.get('/api/v1/sessions/:id/messages', bridged(async (req, res) => {
  const got = await bridgeCall(req, res, 'get_messages', req.params.id)
  if (!got) return
  if (!ownSession(req.params.id, got.org)) return notFound(res, 'session')
  ok(res, MESSAGES.get(req.params.id) || [])
}))

app.post('/api/v1/sessions/:id/messages', bridged(async (req, res) => {
  const got = await bridgeCall(req, res, 'post_message', req.params.id)
  if (!got) return
  if (!ownSession(req.params.id, got.org)) return notFound(res, 'session')
  const body = got.body
  if (!body || typeof body !== 'object' || !['user', 'assistant'].includes(body.role) || typeof body.content !== 'string') {
    return failure(res, 400, 'VALIDATION_ERROR', 'role and content are required')
  }
  const message = {
    id: `msg-${ids++}`,
    sessionId: req.params.id,
    role: body.role,
    content: body.content,
    parentId: body.parentId ?? null,
    metadata: body.metadata ?? null,
    createdAt: nowIso()
  }
  MESSAGES.get(req.params.id).push(message)
  ok(res, message, 201)
}))

app.get('/api/v1/agents/:id', bridged(async (req, res) => {
  const got = await bridgeCall(req, res, 'get_agent', req.params.id)
  if (!got) return
  const agent = AGENTS.get(req.params.id)
  if (!agent || agent.orgId !== got.org) return notFound(res, 'agent')
  ok(res, { ...agent, config: JSON.stringify(agent.config) })
}))

app.all('*', (req, res) => {
  if (['GET', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(req.method)) return echo(req, res)
  res.status(405).json({ detail: 'Method Not Allowed' })
})

const port = parseInt(process.env.PORT || '3001', 10)
const server = app.listen(port, '127.0.0.1', () => {
  console.log(`legacy stand-in on 127.0.0.1:${port}`)
})
// Keep-alive like uvicorn's (5 s), above the proxy's idle pool checks.
server.keepAliveTimeout = 5000
process.on('SIGTERM', () => server.close(() => process.exit(0)))
