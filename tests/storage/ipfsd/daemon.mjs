// An offline js-ipfs node serving the IPFS HTTP RPC API (/api/v0), for
// KuboStore's tests: Kubo's Go daemon cannot be installed on these machines.
//
//   node daemon.mjs REPO_DIR [PORT]
//
// Builds a fresh repo in REPO_DIR, serves /api/v0 on 127.0.0.1:PORT (0 or
// absent: a free port the kernel picks), prints `API http://127.0.0.1:N`
// on stdout once the API answers, and runs until killed or until its stdin
// closes. It is ipfs-daemon's Daemon.start() (what `jsipfs daemon` runs)
// without the gateway, the gRPC server and any network service.

// Some of ipfs@0.66.1's newer transitive dependencies call
// Promise.withResolvers, which Node 20 lacks; define it before importing them.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const [repo, port = '0'] = process.argv.slice(2)
if (!repo || !/^\d+$/.test(port)) {
  console.error('usage: node daemon.mjs REPO_DIR [PORT]')
  process.exit(2)
}

const { create } = await import('ipfs-core')
const { HttpApi } = await import('ipfs-http-server')

const ipfs = await create({
  repo,
  repoAutoMigrate: false,
  silent: true,
  // start: false keeps libp2p and bitswap off: the node never dials out, and a
  // block it does not hold is "not found" at once instead of a wait on bitswap.
  start: false,
  preload: { enabled: false },
  init: { algorithm: 'Ed25519', emptyRepo: true },
  config: {
    Bootstrap: [],
    Addresses: {
      Swarm: [],
      Announce: [],
      NoAnnounce: [],
      API: `/ip4/127.0.0.1/tcp/${port}`,
      Gateway: '',
      RPC: '',
      Delegates: []
    },
    Discovery: { MDNS: { Enabled: false }, webRTCStar: { Enabled: false } },
    Routing: { Type: 'none' }
  }
})

const api = new HttpApi(ipfs)
await api.start()
// The bound address (port 0 picks one) is only on the hapi server object.
const { host, port: bound } = api._apiServers[0].info

async function shutdown () {
  await api.stop()
  await ipfs.stop()
  process.exit(0)
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
// The test process holds our stdin open: if it dies without killing us, stop too.
process.stdin.on('end', shutdown)
process.stdin.resume()

console.log(`API http://${host}:${bound}`)
