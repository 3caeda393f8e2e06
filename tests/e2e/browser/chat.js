// The web app's chat request and read loop, as apps/web/hooks/useChat.ts (semibot e4e56a8) has
// them, without React: the same fetch (method, headers, body; no `credentials` option, so the
// default same-origin) and the same reader: every network read is decoded and split on '\n' by
// itself, its event state starts afresh, and an event is dispatched on a bare empty line. An
// event cut between two reads is lost, exactly as in the app.
'use strict'

const SSE_BASE_URL = new URLSearchParams(location.search).get('api') + '/api/v1'

function getAuthToken () {
  return localStorage.getItem('auth_token') ?? undefined
}

// Resolves with what the page saw: the status, every dispatched event, the reads, or the error
// the app would show (a CORS failure is a TypeError "Failed to fetch").
async function sendMessage ({ sessionId, agentId, message, parentMessageId }) {
  const seen = { status: null, events: [], reads: 0, error: null, headers: {} }
  let url
  let body
  if (sessionId) {
    url = `${SSE_BASE_URL}/chat/sessions/${sessionId}`
    body = { message, parentMessageId }
  } else {
    url = `${SSE_BASE_URL}/chat/start`
    body = { agentId, message }
  }
  const controller = new AbortController()
  // When each event reached the page, from the request (not the app's: the test's measure).
  const t0 = performance.now()
  try {
    const token = getAuthToken()
    const response = await fetch(url, {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        Accept: 'text/event-stream',
        ...(token ? { Authorization: `Bearer ${token}` } : {})
      },
      body: JSON.stringify(body),
      signal: controller.signal
    })
    seen.status = response.status
    for (const [k, v] of response.headers) seen.headers[k] = v
    if (!response.ok) {
      const error = await response.json().catch(() => ({}))
      throw new Error(error.error?.message ?? `HTTP ${response.status}`)
    }
    if (!response.body) {
      throw new Error('empty response body')
    }
    const reader = response.body.getReader()
    const decoder = new TextDecoder()
    while (true) {
      const { done, value } = await reader.read()
      if (done) break
      seen.reads += 1
      const chunk = decoder.decode(value)
      const lines = chunk.split('\n')
      let currentEvent = ''
      let currentData = ''
      for (const line of lines) {
        if (line.startsWith('event:')) {
          currentEvent = line.slice(6).trim()
        } else if (line.startsWith('data:')) {
          currentData = line.slice(5).trim()
        } else if (line === '' && currentData) {
          try {
            seen.events.push({ event: currentEvent, data: JSON.parse(currentData), at: performance.now() - t0 })
          } catch (e) {
            seen.events.push({ event: 'unparsed', data: currentData })
          }
          currentEvent = ''
          currentData = ''
        }
      }
    }
  } catch (error) {
    seen.error = `${error.name}: ${error.message}`
  }
  return seen
}

// FileDownload.tsx: a plain link, opened in a new tab, with no Authorization.
function openFile (url, filename) {
  const a = document.createElement('a')
  a.href = url
  a.download = filename
  a.target = '_blank'
  a.rel = 'noopener noreferrer'
  document.body.appendChild(a)
  a.click()
  document.body.removeChild(a)
}

// The app's login page keeps the JWT in localStorage and in the auth_token cookie.
function login (token) {
  localStorage.setItem('auth_token', token)
  document.cookie = `auth_token=${token}; path=/; SameSite=Lax`
}

window.sendMessage = sendMessage
window.openFile = openFile
window.login = login
