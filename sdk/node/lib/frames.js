'use strict';
/**
 * The local protocol's framing (docs/POOLS.md): a 4-byte big-endian length, then that many
 * bytes of one UTF-8 JSON object.
 */

/** The largest frame the drone accepts by default (its `max_frame_len`). */
const DEFAULT_MAX_FRAME = 1024 * 1024;

/**
 * One frame, header and body in one buffer, so it goes out in one write.
 * @param {string} json the serialized message
 * @returns {Buffer}
 */
function encodeFrame(json) {
  const len = Buffer.byteLength(json);
  const buf = Buffer.allocUnsafe(4 + len);
  buf.writeUInt32BE(len, 0);
  buf.write(json, 4, len, 'utf8');
  return buf;
}

/**
 * An incremental parser: feed it chunks as they arrive, in any sizes; it calls `onFrame`
 * with each complete frame's body (a string) in order. A frame split over many chunks is
 * joined once, when its last byte has arrived.
 */
class FrameParser {
  /**
   * @param {(body: string) => void} onFrame
   * @param {number} [maxLen] frames longer than this are refused (push throws)
   */
  constructor(onFrame, maxLen = 64 * 1024 * 1024) {
    this.onFrame = onFrame;
    this.maxLen = maxLen;
    /** @type {Buffer[]} chunks of an incomplete frame */
    this.pending = [];
    this.pendingLen = 0;
    /** body length of the incomplete frame, or -1 while its header is incomplete */
    this.need = -1;
  }

  /** @param {Buffer} chunk */
  push(chunk) {
    if (this.pendingLen > 0) {
      this.pending.push(chunk);
      this.pendingLen += chunk.length;
      if (this.need < 0) {
        if (this.pendingLen < 4) return;
        const head = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
        this.pending = [head];
        this.need = this._length(head, 0);
      }
      if (this.pendingLen < 4 + this.need) return;
      chunk = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending, this.pendingLen);
      this.pending = [];
      this.pendingLen = 0;
      this.need = -1;
    }
    let off = 0;
    const end = chunk.length;
    while (end - off >= 4) {
      const len = this._length(chunk, off);
      if (end - off - 4 < len) break;
      const body = chunk.toString('utf8', off + 4, off + 4 + len);
      off += 4 + len;
      this.onFrame(body);
    }
    if (off < end) {
      const rest = off === 0 ? chunk : chunk.subarray(off);
      this.pending.push(rest);
      this.pendingLen = rest.length;
      this.need = rest.length >= 4 ? this._length(rest, 0) : -1;
    }
  }

  /** Bytes of an incomplete frame still held (non-zero at end-of-file means a cut frame). */
  get buffered() {
    return this.pendingLen;
  }

  _length(buf, off) {
    const len = buf.readUInt32BE(off);
    if (len > this.maxLen) {
      throw new RangeError(`frame of ${len} bytes is over the limit of ${this.maxLen}`);
    }
    return len;
  }
}

module.exports = { FrameParser, encodeFrame, DEFAULT_MAX_FRAME };
