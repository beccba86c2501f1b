// sharp (libvips) doing what kickstart's POST /resize does: the image in the body, fitted inside
// width x height without enlarging, in its own format (a JPEG of quality 80, or a PNG). GET /health
// answers once it listens. Serves on 127.0.0.1:PORT; sharp's defaults otherwise.
'use strict';
const http = require('node:http');
const sharp = require('sharp');

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (req.method === 'GET' && url.pathname === '/health') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    return res.end(JSON.stringify({ sharp: sharp.versions.sharp, libvips: sharp.versions.vips }));
  }
  const width = Number(url.searchParams.get('width'));
  const height = Number(url.searchParams.get('height'));
  if (req.method !== 'POST' || url.pathname !== '/resize' || !(width > 0 && height > 0)) {
    res.writeHead(400);
    return res.end();
  }
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', async () => {
    try {
      const image = sharp(Buffer.concat(chunks));
      const { format } = await image.metadata();
      const resized = image.resize(width, height, { fit: 'inside', withoutEnlargement: true });
      const out = format === 'png' ? resized.png({ compressionLevel: 1 }) : resized.jpeg({ quality: 80 });
      const body = await out.toBuffer();
      res.writeHead(200, { 'Content-Type': `image/${format}`, 'Content-Length': body.length });
      res.end(body);
    } catch (err) {
      res.writeHead(422);
      res.end(String(err.message));
    }
  });
});
server.listen(Number(process.env.PORT), '127.0.0.1');
