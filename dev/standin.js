#!/usr/bin/env node
// Starts one local AWS protocol stand-in on 127.0.0.1, creates the adtrack
// resources in it, and prints "READY <port>" once they are ACTIVE.
//
//   node dev/standin.js kinesis  --port 0 [--path DIR] [--stream NAME --shards N] [--extra-stream NAME (1 shard)]
//   node dev/standin.js dynamodb --port 0 [--path DIR] [--tables dev/tables.json]
//   node dev/standin.js scan     --port N --table NAME [--limit N]   (prints items as JSON lines)
//
// kinesalite and dynalite are pinned in dev/package.json. ADTRACK_AWS_CALL_LOG:
// see logCalls below. Their CLIs bind every
// interface, so this launcher calls listen(port, '127.0.0.1') itself.
'use strict'

const path = require('path')
const fs = require('fs')

function parseArgs(argv) {
  const out = { _: [] }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (a.startsWith('--')) out[a.slice(2)] = argv[++i]
    else out._.push(a)
  }
  return out
}

// The stand-ins check that a request is shaped like a SigV4 request but do not
// verify the signature.
async function call(port, target, contentType, body) {
  const res = await fetch(`http://127.0.0.1:${port}/`, {
    method: 'POST',
    headers: {
      'Content-Type': contentType,
      'X-Amz-Target': target,
      'X-Amz-Date': new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+/, ''),
      Authorization: 'AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/service/aws4_request, ' +
        'SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=00',
    },
    body: JSON.stringify(body),
  })
  const text = await res.text()
  const data = text ? JSON.parse(text) : {}
  if (!res.ok) {
    const err = new Error(`${target}: ${res.status} ${data.__type || ''} ${data.message || text}`)
    err.type = String(data.__type || '')
    throw err
  }
  return data
}

const kinesis = (port, op, body) => call(port, `Kinesis_20131202.${op}`, 'application/x-amz-json-1.1', body)
const dynamodb = (port, op, body) => call(port, `DynamoDB_20120810.${op}`, 'application/x-amz-json-1.0', body)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function ensureStream(port, name, shards) {
  try {
    await kinesis(port, 'CreateStream', { StreamName: name, ShardCount: shards })
  } catch (e) {
    if (!e.type.includes('ResourceInUseException')) throw e
  }
  for (;;) {
    const d = await kinesis(port, 'DescribeStreamSummary', { StreamName: name })
    if (d.StreamDescriptionSummary.StreamStatus === 'ACTIVE') return
    await sleep(20)
  }
}

async function ensureTable(port, def) {
  try {
    await dynamodb(port, 'CreateTable', def)
  } catch (e) {
    if (!e.type.includes('ResourceInUseException')) throw e
  }
  for (;;) {
    const d = await dynamodb(port, 'DescribeTable', { TableName: def.TableName })
    if (d.Table.TableStatus === 'ACTIVE') return
    await sleep(20)
  }
}

// With ADTRACK_AWS_CALL_LOG set, every call made by an adtrack binary (its
// AWS app name, `app/adtrack-...` in the user agent) is appended to that
// file as "app<TAB>service:Operation<TAB>resource": dev/check_iam.py
// checks them against the IAM roles of the templates.
function logCalls(server, service) {
  const file = process.env.ADTRACK_AWS_CALL_LOG
  if (!file) return
  server.prependListener('request', (req) => {
    const agent = `${req.headers['x-amz-user-agent'] || ''} ${req.headers['user-agent'] || ''}`
    const app = (agent.match(/\bapp\/([A-Za-z0-9._-]+)/) || [])[1]
    if (!app) return
    const op = String(req.headers['x-amz-target'] || '').split('.').pop()
    const chunks = []
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => {
      let body = {}
      try { body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') } catch (e) { body = {} }
      const resources = body.TableName || body.StreamName ||
        (body.StreamARN || '').split('/').pop() ||
        Object.keys(body.RequestItems || {}).join(',')
      fs.appendFileSync(file, `${app}\t${service}:${op}\t${resources || ''}\n`)
    })
  })
}

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => resolve(server.address().port))
  })
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  const kind = args._[0]
  const port = Number(args.port || 0)
  if (kind === 'kinesis') {
    const server = require('kinesalite')({ path: args.path, createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 50 })
    logCalls(server, 'kinesis')
    const bound = await listen(server, port)
    if (args.stream) await ensureStream(bound, args.stream, Number(args.shards || 1))
    if (args['extra-stream']) await ensureStream(bound, args['extra-stream'], 1)
    console.log(`READY ${bound}`)
  } else if (kind === 'dynamodb') {
    const server = require('dynalite')({ path: args.path, createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 })
    logCalls(server, 'dynamodb')
    const bound = await listen(server, port)
    const file = args.tables || path.join(__dirname, 'tables.json')
    for (const def of JSON.parse(fs.readFileSync(file, 'utf8'))) await ensureTable(bound, def)
    console.log(`READY ${bound}`)
  } else if (kind === 'scan') {
    let start, n = 0
    const limit = Number(args.limit || 1e9)
    do {
      const page = await dynamodb(port, 'Scan', { TableName: args.table, ExclusiveStartKey: start })
      for (const item of page.Items) {
        if (n++ >= limit) return
        const flat = {}
        for (const [k, v] of Object.entries(item)) flat[k] = Object.values(v)[0]
        console.log(JSON.stringify(flat))
      }
      start = page.LastEvaluatedKey
    } while (start)
  } else {
    console.error('usage: standin.js kinesis|dynamodb|scan [--port N] [--path DIR] ...')
    process.exit(2)
  }
}

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0))
main().catch((e) => {
  console.error(`standin: ${e.message}`)
  process.exit(1)
})
