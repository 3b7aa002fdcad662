// CID oracle for tests/storage/test_cid.py, built on ipfs-unixfs-importer.
//
//   node unixfs_cid.mjs --cid-version 0|1 --raw-leaves true|false
//                       [--chunk-size 262144] [--max-links 174] FILE...
//
// prints one line `<cid> <file>` per file. Every option of Kubo's `ipfs add`
// is spelled out, because the importer's own defaults differ (CIDv1 with raw
// leaves): fixed-size chunks, balanced layout, dag-pb leaves of UnixFS type
// 'file', a single-chunk file reduced to its leaf, Links before Data.
import { createReadStream } from 'node:fs'
import { parseArgs } from 'node:util'
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'cid-version': { type: 'string' },
    'raw-leaves': { type: 'string' },
    'chunk-size': { type: 'string', default: '262144' },
    'max-links': { type: 'string', default: '174' }
  }
})
const cidVersion = Number(values['cid-version'])
const rawLeaves = values['raw-leaves']
if (![0, 1].includes(cidVersion) || !['true', 'false'].includes(rawLeaves) || positionals.length === 0) {
  console.error('usage: node unixfs_cid.mjs --cid-version 0|1 --raw-leaves true|false ' +
    '[--chunk-size N] [--max-links N] FILE...')
  process.exit(2)
}

// Only CIDs are wanted: the blockstore drops every block.
const discard = { put: async (cid) => cid }

for (const file of positionals) {
  const options = {
    cidVersion,
    rawLeaves: rawLeaves === 'true',
    chunker: fixedSize({ chunkSize: Number(values['chunk-size']) }),
    layout: balanced({ maxChildrenPerNode: Number(values['max-links']) }),
    reduceSingleLeafToSelf: true,
    leafType: 'file',
    fieldOrder: 'links-first',
    wrapWithDirectory: false
  }
  let root
  // No `path`: a nameless entry is imported as a bare file, like `ipfs add FILE`.
  for await (const entry of importer([{ content: createReadStream(file) }], discard, options)) {
    root = entry
  }
  console.log(`${root.cid.toString()} ${file}`)
}
