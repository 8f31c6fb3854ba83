// A scripted session with the official, unmodified E2B JS SDK (npm e2b 2.51.0) against hutchd's
// E2B-compatible server.
//
//   E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT \
//   E2B_API_KEY=$(cat DATA_DIR/api-token) target/e2b-sdk/bin/node tests/e2b/session.mjs
//
// `e2b` resolves from tests/e2b/node_modules (scripts/install-e2b-sdks.sh). The SDK reads the three
// variables itself. Optional: E2B_TEST_TEMPLATE (default: none given, so the SDK asks for `base`),
// E2B_TEST_REQUEST_TIMEOUT (seconds, default 120). Prints `ok N ...` per passed step; the first
// failed check prints `FAIL: ...` and exits 1. One sandbox; pause and connect resume that one.

import { createHash, randomBytes, randomUUID } from 'node:crypto'

let e2b
try {
  e2b = await import('e2b')
} catch (e) {
  console.log(`FAIL: the e2b SDK does not import (${e.message}): run scripts/install-e2b-sdks.sh`)
  process.exit(1)
}
const {
  Sandbox,
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  FileType,
  NotFoundError,
  SandboxNotFoundError,
  TimeoutError,
} = e2b

for (const v of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[v]) {
    console.log(`FAIL: ${v} is not set`)
    process.exit(2)
  }
}

const TEMPLATE = process.env.E2B_TEST_TEMPLATE || undefined
const EXPECT_TEMPLATE = TEMPLATE ?? 'base'
const RT_MS = Math.round(parseFloat(process.env.E2B_TEST_REQUEST_TIMEOUT || '120') * 1000)
const RUN = randomUUID().replaceAll('-', '').slice(0, 12)
const T0 = performance.now()
let n = 0

class Failed extends Error {}

const secs = () => ((performance.now() - T0) / 1000).toFixed(1).padStart(6)
function ok(msg) {
  n += 1
  console.log(`ok ${n} [${secs()}s] ${msg}`)
}
function check(cond, what, got) {
  if (!cond) throw new Failed(what + (got === undefined ? '' : ` (got ${JSON.stringify(got)})`))
}
// JSON with object keys sorted: maps compare by content, not by key order.
function canon(v) {
  return JSON.stringify(v, (_, x) =>
    x && typeof x === 'object' && !Array.isArray(x)
      ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, x[k]]))
      : x)
}
function eq(got, want, what) {
  const g = canon(got)
  const w = canon(want)
  if (g !== w) throw new Failed(`${what}: expected ${w}, got ${g}`)
}
async function raises(cls, fn, what) {
  let r
  try {
    r = await fn()
  } catch (e) {
    if (e instanceof cls) return e
    throw new Failed(`${what}: expected ${cls.name}, got ${e?.constructor?.name}: ${e?.message}`)
  }
  throw new Failed(`${what}: expected ${cls.name}, got no error but ${JSON.stringify(r)}`)
}
async function waitFor(fn, what, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > end) throw new Failed(`${what}: not seen within ${timeoutMs / 1000} s`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

async function badInput() {
  await raises(
    AuthenticationError,
    () => Sandbox.create(EXPECT_TEMPLATE, { apiKey: 'e2b_' + '2'.repeat(40), requestTimeoutMs: RT_MS }),
    'create with a wrong API key',
  )
  await raises(
    AuthenticationError,
    () => Sandbox.list({ apiKey: 'not-a-key', requestTimeoutMs: RT_MS }).nextItems(),
    'list with a wrong API key',
  )
  ok('a wrong API key raises AuthenticationError (create, list)')
  const missing = 'i' + randomUUID().replaceAll('-', '').slice(0, 19)
  const e = await raises(NotFoundError, () => Sandbox.connect(missing, { requestTimeoutMs: RT_MS }), 'connect unknown id')
  check(e instanceof SandboxNotFoundError, 'connect: SandboxNotFoundError', e.constructor.name)
  await raises(SandboxNotFoundError, () => Sandbox.getInfo(missing, { requestTimeoutMs: RT_MS }), 'getInfo unknown id')
  eq(await Sandbox.kill(missing, { requestTimeoutMs: RT_MS }), false, 'kill of an unknown id')
  ok('an unknown sandbox id: connect/getInfo raise SandboxNotFoundError, kill returns false')
}

async function commands(sbx) {
  const c = sbx.commands
  let r = await c.run('echo hello; echo oops >&2')
  eq([r.stdout, r.stderr, r.exitCode], ['hello\n', 'oops\n', 0], 'foreground run')
  ok('commands.run: stdout, stderr, exit code 0')

  r = await c.run('id -u; pwd; echo $HOME')
  eq(r.stdout, '1000\n/home/user\n/home/user\n', 'default user')
  r = await c.run('id -u; pwd; echo $HOME', { user: 'root' })
  eq(r.stdout, '0\n/root\n/root\n', "user: 'root'")
  ok('default user uid 1000 in /home/user; root uid 0 in /root')

  r = await c.run('echo "$SBX_ENV|$CMD_ENV"; pwd', { envs: { CMD_ENV: 'cmd' }, cwd: '/tmp' })
  eq(r.stdout, 'sbx|cmd\n/tmp\n', 'envs and cwd')
  r = await c.run('echo "$SBX_ENV"', { envs: { SBX_ENV: 'overridden' } })
  eq(r.stdout, 'overridden\n', 'a command env overrides the sandbox one')
  ok('envs (sandbox-wide, per command, override) and cwd')

  const outs = []
  const errs = []
  let first
  r = await c.run('for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.7; done', {
    onStdout: (d) => {
      first ??= performance.now()
      outs.push(d)
    },
    onStderr: (d) => errs.push(d),
  })
  const end = performance.now()
  eq([outs.join(''), errs.join('')], ['out1\nout2\nout3\n', 'err1\nerr2\nerr3\n'], 'onStdout/onStderr')
  check(end - first > 1000, 'output streams while the command runs', end - first)
  ok('onStdout/onStderr stream while the command runs')

  let e = await raises(CommandExitError, () => c.run('echo before; echo bad >&2; exit 3'), 'exit 3')
  eq([e.exitCode, e.stdout, e.stderr], [3, 'before\n', 'bad\n'], 'CommandExitError')
  ok('a non-zero exit raises CommandExitError with exitCode 3 and stderr')

  const t = performance.now()
  await raises(TimeoutError, () => c.run('sleep 60', { timeoutMs: 3000 }), 'a command over its timeoutMs')
  const took = (performance.now() - t) / 1000
  check(took < 30, 'the timeout cut it short', took)
  ok(`run(timeoutMs: 3000) of sleep 60 raises TimeoutError after ${took.toFixed(1)} s`)

  let h = await c.run('sleep 1; echo done-bg', { background: true })
  check(h.pid > 0, 'background pid', h.pid)
  r = await h.wait()
  eq([r.stdout, r.exitCode], ['done-bg\n', 0], 'background wait')
  ok(`background command (pid ${h.pid}) and handle.wait()`)

  h = await c.run('sleep 600', { background: true })
  const listed = (await c.list()).find((p) => p.pid === h.pid)
  check(listed, 'commands.list shows the background pid', h.pid)
  eq([listed.cmd, listed.args], ['/bin/bash', ['-l', '-c', 'sleep 600']], 'listed cmd and args')
  eq(await h.kill(), true, 'handle.kill()')
  e = await raises(CommandExitError, () => h.wait(), 'wait on a killed command')
  check(e.exitCode !== 0, 'a killed command has a non-zero exit code', e.exitCode)
  await waitFor(async () => !(await c.list()).some((p) => p.pid === h.pid), 'killed pid gone from commands.list')
  eq(await c.kill(h.pid), false, 'commands.kill of a pid that is gone')
  ok(`commands.list, kill (exit code ${e.exitCode})`)

  h = await c.run('for i in $(seq 1 6); do echo tick$i; sleep 0.5; done', { background: true })
  await h.disconnect()
  const got = []
  const h2 = await c.connect(h.pid, { onStdout: (d) => got.push(d) })
  r = await h2.wait()
  check(got.join('').includes('tick6\n') && r.stdout.includes('tick6\n'), 'connect: the rest of the output', r.stdout)
  eq(r.exitCode, 0, 'exit code through connect')
  ok('commands.connect to a running background command')

  h = await c.run('cat; echo eof', { background: true, stdin: true })
  await h.sendStdin('line one\n')
  await c.sendStdin(h.pid, new TextEncoder().encode('line two\n'))
  await h.closeStdin()
  r = await h.wait()
  eq(r.stdout, 'line one\nline two\neof\n', 'stdin')
  ok('stdin: sendStdin (handle and commands), closeStdin gives EOF')
}

async function files(sbx) {
  const f = sbx.files
  let w = await f.write('notes/hello.txt', 'hello world\n')
  eq(w.path, '/home/user/notes/hello.txt', 'relative path against /home/user')
  eq(await f.read('/home/user/notes/hello.txt'), 'hello world\n', 'read text')
  const blob = new Uint8Array(4096).map((_, i) => i % 256)
  await f.write('/tmp/bin.dat', blob.buffer)
  const back = await f.read('/tmp/bin.dat', { format: 'bytes' })
  check(Buffer.from(back).equals(Buffer.from(blob)), 'read bytes', back.length)
  ok('write/read text (relative path) and bytes')

  const info = await f.getInfo('/home/user/notes/hello.txt')
  eq([info.name, info.type, info.size, info.path, info.owner], ['hello.txt', FileType.FILE, 12,
    '/home/user/notes/hello.txt', 'user'], 'getInfo')
  eq((await f.getInfo('/home/user/notes')).type, FileType.DIR, 'getInfo of a directory')
  eq([await f.exists('/home/user/notes/hello.txt'), await f.exists('/home/user/nope')], [true, false], 'exists')
  await raises(FileNotFoundError, () => f.read('/home/user/nope'), 'read of a missing file')
  ok('getInfo, exists, FileNotFoundError')

  eq(await f.makeDir('/home/user/d1/d2'), true, 'makeDir')
  eq(await f.makeDir('/home/user/d1/d2'), false, 'makeDir again')
  await f.write('/home/user/d1/a.txt', 'a')
  await f.write('/home/user/d1/d2/b.txt', 'b')
  const one = (await f.list('/home/user/d1')).map((e) => [e.name, e.type]).sort()
  eq(one, [['a.txt', 'file'], ['d2', 'dir']], 'list depth 1')
  const two = (await f.list('/home/user/d1', { depth: 2 })).map((e) => e.path).sort()
  eq(two, ['/home/user/d1/a.txt', '/home/user/d1/d2', '/home/user/d1/d2/b.txt'], 'list depth 2')
  const r = await f.rename('/home/user/d1/a.txt', '/home/user/d1/c.txt')
  eq(r.path, '/home/user/d1/c.txt', 'rename')
  eq(await f.exists('/home/user/d1/a.txt'), false, 'old name gone')
  await f.remove('/home/user/d1')
  eq(await f.exists('/home/user/d1'), false, 'removed directory')
  ok('makeDir, list depth 1 and 2, rename, remove')

  await f.makeDir('/home/user/watched')
  const events = []
  const wh = await f.watchDir('/home/user/watched', (ev) => events.push(ev), { timeoutMs: 60000 })
  await f.write('/home/user/watched/new.txt', 'x')
  const evs = await waitFor(() => {
    const m = events.filter((ev) => ev.name === 'new.txt')
    return m.length ? m : undefined
  }, 'a watchDir event for new.txt')
  await wh.stop()
  ok(`watchDir: ${[...new Set(evs.map((ev) => ev.type))].sort()} for new.txt`)

  const big = randomBytes(3 * 1024 * 1024 + 5)
  const digest = createHash('sha256').update(big).digest('hex')
  await f.write('/tmp/big.bin', new Blob([big]))
  const bigBack = await f.read('/tmp/big.bin', { format: 'bytes' })
  eq(createHash('sha256').update(bigBack).digest('hex'), digest, '3 MiB read back')
  eq((await sbx.commands.run('sha256sum /tmp/big.bin')).stdout.split(' ')[0], digest, 'sha256 in the sandbox')
  await f.write('/tmp/big2.bin', new Blob([big]), { useOctetStream: true })
  eq((await sbx.commands.run('sha256sum /tmp/big2.bin')).stdout.split(' ')[0], digest, 'octet-stream upload')
  ok('a 3 MiB binary file up (multipart and octet-stream) and down')

  const route = { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49983' }
  const dl = await sbx.downloadUrl('/tmp/bin.dat')
  let res = await fetch(dl, { headers: route })
  eq(res.status, 200, `GET ${dl}`)
  check(Buffer.from(await res.arrayBuffer()).equals(Buffer.from(blob)), 'downloadUrl content')
  const up = await sbx.uploadUrl('/tmp/uploaded.txt')
  const form = new FormData()
  form.append('file', new Blob(['via uploadUrl\n']), 'uploaded.txt')
  res = await fetch(up, { method: 'POST', headers: route, body: form })
  check(res.ok, `POST ${up}`, res.status)
  eq(await f.read('/tmp/uploaded.txt'), 'via uploadUrl\n', 'uploadUrl content')
  ok('downloadUrl and uploadUrl')

  w = await f.write('rootfile.txt', 'r\n', { user: 'root' })
  eq(w.path, '/root/rootfile.txt', "relative path as root against /root")
  eq((await f.getInfo('/root/rootfile.txt', { user: 'root' })).owner, 'root', 'owner')
  let denied
  try {
    await f.read('/root/rootfile.txt')
  } catch (e) {
    denied = e
  }
  check(denied, 'the default user cannot read /root (0700)')
  ok(`user root vs the default user: homes, owners, permissions (${denied.constructor.name})`)
}

async function main() {
  await badInput()
  let t = performance.now()
  const opts = {
    timeoutMs: 600_000,
    metadata: { suite: 'hutch-e2b-js', run: RUN },
    envs: { SBX_ENV: 'sbx' },
    requestTimeoutMs: RT_MS,
  }
  // No template: the SDK's default (`base`).
  let sbx = await (TEMPLATE ? Sandbox.create(TEMPLATE, opts) : Sandbox.create(opts))
  const sid = sbx.sandboxId
  ok(`Sandbox.create -> ${sid} in ${((performance.now() - t) / 1000).toFixed(1)} s`)
  try {
    eq(await sbx.isRunning(), true, 'isRunning')
    const info = await sbx.getInfo()
    eq([info.sandboxId, info.metadata, info.state], [sid, { suite: 'hutch-e2b-js', run: RUN }, 'running'], 'getInfo')
    check([info.templateId, info.name].includes(EXPECT_TEMPLATE), 'template', [info.templateId, info.name])
    const left = (info.endAt.getTime() - Date.now()) / 1000
    check(left > 450 && left <= 605, 'endAt about 600 s away', left)
    ok(`getInfo: metadata, template ${info.templateId}, running, ends in ${left.toFixed(0)} s`)

    await commands(sbx)
    await files(sbx)

    let found = await Sandbox.list({ query: { metadata: { run: RUN } }, requestTimeoutMs: RT_MS }).nextItems()
    eq(found.map((s) => [s.sandboxId, s.state, s.metadata.suite]), [[sid, 'running', 'hutch-e2b-js']], 'list')
    eq(await Sandbox.list({ query: { metadata: { run: 'not-' + RUN } }, requestTimeoutMs: RT_MS }).nextItems(), [],
      'list with a metadata value nobody has')
    ok('Sandbox.list({query: {metadata}}) finds exactly this sandbox')

    await sbx.setTimeout(1_200_000)
    const left2 = ((await sbx.getInfo()).endAt.getTime() - Date.now()) / 1000
    check(left2 > 1050 && left2 <= 1205, 'setTimeout moved endAt', left2)
    ok(`setTimeout(1200 s): ends in ${left2.toFixed(0)} s`)

    await sbx.files.write('/tmp/keep.txt', 'kept\n')
    // hutch: processes started through envd end with the pause (docs/e2b.md); one in a session
    // of its own lives on.
    await sbx.commands.run("setsid sh -c 'echo $$ > /tmp/bg.pid; exec sleep 100000' </dev/null >/dev/null 2>&1 &")
    t = performance.now()
    eq(await sbx.pause(), true, 'pause')
    ok(`pause in ${((performance.now() - t) / 1000).toFixed(1)} s`)
    eq((await Sandbox.getInfo(sid, { requestTimeoutMs: RT_MS })).state, 'paused', 'state after pause')
    found = await Sandbox.list({ query: { metadata: { run: RUN }, state: ['paused'] }, requestTimeoutMs: RT_MS }).nextItems()
    eq(found.map((s) => s.sandboxId), [sid], 'list state paused')
    t = performance.now()
    sbx = await Sandbox.connect(sid, { requestTimeoutMs: RT_MS })
    ok(`Sandbox.connect resumed it in ${((performance.now() - t) / 1000).toFixed(1)} s`)
    eq((await sbx.getInfo()).state, 'running', 'state after connect')
    eq(await sbx.files.read('/tmp/keep.txt'), 'kept\n', '/tmp file after resume')
    eq((await sbx.commands.run('kill -0 $(cat /tmp/bg.pid) && echo alive')).stdout, 'alive\n', 'a process of its own after resume')
    eq((await sbx.commands.run('echo back')).stdout, 'back\n', 'a command after resume')
    ok('after resume: /tmp file, background process, commands')
  } catch (e) {
    await Sandbox.kill(sid, { requestTimeoutMs: RT_MS }).catch(() => {})
    throw e
  }

  eq(await sbx.kill(), true, 'kill')
  eq(await sbx.isRunning(), false, 'isRunning after kill')
  await raises(SandboxNotFoundError, () => Sandbox.getInfo(sid, { requestTimeoutMs: RT_MS }), 'getInfo after kill')
  await raises(SandboxNotFoundError, () => Sandbox.connect(sid, { requestTimeoutMs: RT_MS }), 'connect after kill')
  eq(await Sandbox.kill(sid, { requestTimeoutMs: RT_MS }), false, 'a second kill')
  eq(await Sandbox.list({ query: { metadata: { run: RUN } }, requestTimeoutMs: RT_MS }).nextItems(), [], 'list after kill')
  ok('kill; afterwards not running, getInfo/connect raise SandboxNotFoundError, kill false, not listed')
  console.log(`PASS session.mjs: ${n} steps in ${secs().trim()} s`)
}

try {
  await main()
  process.exit(0)
} catch (e) {
  if (e instanceof Failed) {
    console.log(`FAIL: ${e.message}`)
  } else {
    console.log(e?.stack ?? e)
    console.log(`FAIL: unexpected ${e?.constructor?.name}: ${e?.message}`)
  }
  process.exit(1)
}
