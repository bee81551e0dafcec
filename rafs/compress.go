package rafs

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/zeebo/blake3"
)

// Chunk codecs. One place for every compressor a blob may use, so that the
// builder, the composer and the cache agree on framing: zstd chunks are
// standard zstd frames, lz4_block chunks are raw LZ4 blocks without a size
// prefix (the uncompressed size comes from the chunk-info entry), gzip
// chunks are gzip members (§11).

// ErrNotSmaller is returned by Compress when the compressed form would not
// be smaller than the input; the caller stores the chunk raw, as nydus does.
var ErrNotSmaller = errors.New("rafs: compressed data not smaller than input")

// The zstd encoder and decoder are safe for concurrent EncodeAll/DecodeAll
// and expensive to create, so one of each serves the process.
var (
	zstdEncoderOnce sync.Once
	zstdEncoder     *zstd.Encoder
	zstdDecoderOnce sync.Once
	zstdDecoder     *zstd.Decoder
)

func sharedZstdEncoder() *zstd.Encoder {
	zstdEncoderOnce.Do(func() {
		// Errors are impossible with these options. EncodeAll takes one of
		// the encoder's concurrency slots per call, so the builder's
		// parallel workers need one slot each.
		zstdEncoder, _ = zstd.NewWriter(nil,
			zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)),
			zstd.WithEncoderLevel(zstd.SpeedDefault),
			zstd.WithZeroFrames(true))
	})
	return zstdEncoder
}

func sharedZstdDecoder() *zstd.Decoder {
	zstdDecoderOnce.Do(func() {
		zstdDecoder, _ = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(64<<20)) // chunks are at most 16 MiB
	})
	return zstdDecoder
}

var lz4Compressors = sync.Pool{New: func() any { return new(lz4.Compressor) }}

// Compress appends the compressed form of src to dst[:0] and returns it.
// It returns ErrNotSmaller when compression does not pay off.
func Compress(c Compressor, dst, src []byte) ([]byte, error) {
	dst = dst[:0]
	switch c {
	case CompressNone:
		return append(dst, src...), nil
	case CompressZstd:
		dst = sharedZstdEncoder().EncodeAll(src, dst)
	case CompressLZ4Block:
		bound := lz4.CompressBlockBound(len(src))
		if cap(dst) < bound {
			dst = make([]byte, 0, bound)
		}
		lc := lz4Compressors.Get().(*lz4.Compressor)
		n, err := lc.CompressBlock(src, dst[:bound])
		lz4Compressors.Put(lc)
		if err != nil {
			return nil, fmt.Errorf("rafs: lz4 compress: %w", err)
		}
		if n == 0 { // incompressible
			return nil, ErrNotSmaller
		}
		dst = dst[:n]
	case CompressGzip:
		buf := bytes.NewBuffer(dst)
		zw, err := gzip.NewWriterLevel(buf, gzip.DefaultCompression)
		if err != nil {
			return nil, fmt.Errorf("rafs: gzip compress: %w", err)
		}
		if _, err := zw.Write(src); err != nil {
			return nil, fmt.Errorf("rafs: gzip compress: %w", err)
		}
		if err := zw.Close(); err != nil {
			return nil, fmt.Errorf("rafs: gzip compress: %w", err)
		}
		dst = buf.Bytes()
	default:
		return nil, fmt.Errorf("rafs: unsupported compressor %v", c)
	}
	if len(dst) >= len(src) {
		return nil, ErrNotSmaller
	}
	return dst, nil
}

// Decompress decompresses src into dst, which must have exactly the chunk's
// uncompressed size; any other output length is an error, so a corrupt or
// truncated chunk can never be served short or padded.
func Decompress(c Compressor, dst, src []byte) error {
	switch c {
	case CompressNone:
		if len(src) != len(dst) {
			return fmt.Errorf("rafs: raw chunk is %d bytes, want %d", len(src), len(dst))
		}
		copy(dst, src)
		return nil
	case CompressZstd:
		out, err := sharedZstdDecoder().DecodeAll(src, dst[:0])
		if err != nil {
			return fmt.Errorf("rafs: zstd decompress: %w", err)
		}
		if len(out) != len(dst) {
			return fmt.Errorf("rafs: zstd chunk decompressed to %d bytes, want %d", len(out), len(dst))
		}
		if len(dst) > 0 && &out[0] != &dst[0] { // DecodeAll reallocated: keep the caller's buffer authoritative
			copy(dst, out)
		}
		return nil
	case CompressLZ4Block:
		n, err := lz4.UncompressBlock(src, dst)
		if err != nil {
			return fmt.Errorf("rafs: lz4_block decompress: %w", err)
		}
		if n != len(dst) {
			return fmt.Errorf("rafs: lz4_block chunk decompressed to %d bytes, want %d", n, len(dst))
		}
		return nil
	case CompressGzip:
		zr, err := gzip.NewReader(bytes.NewReader(src))
		if err != nil {
			return fmt.Errorf("rafs: gzip decompress: %w", err)
		}
		zr.Multistream(false)
		if _, err := io.ReadFull(zr, dst); err != nil {
			return fmt.Errorf("rafs: gzip decompress: %w", err)
		}
		var one [1]byte
		if n, _ := zr.Read(one[:]); n != 0 {
			return fmt.Errorf("rafs: gzip chunk longer than %d bytes", len(dst))
		}
		return nil
	}
	return fmt.Errorf("rafs: unsupported compressor %v", c)
}

// Sum is a chunk's digest under d, as chunk-info entries and the chunk
// digest table hold it: sha256 for DigestSHA256, blake3 (32 bytes)
// otherwise, as nydus falls back to blake3.
func (d Digester) Sum(data []byte) [32]byte {
	if d == DigestSHA256 {
		return sha256.Sum256(data)
	}
	return blake3.Sum256(data)
}
