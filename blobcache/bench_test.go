package blobcache_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/zeebo/blake3"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Benchmarks of the cold path (localfs fetch, decompress, verify, write to
// the cache file) and the warm path (ReadAt of cached data). The data is
// BLOBCACHE_BENCH_CORPUS (scripts/bench-blobcache.sh passes the corpus it
// also feeds to zstd -d and lz4 -d), or synthetic text when unset.

const benchChunk = 1 << 20

func benchCorpus(b *testing.B) []byte {
	b.Helper()
	if p := os.Getenv("BLOBCACHE_BENCH_CORPUS"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			b.Fatal(err)
		}
		return data
	}
	rng := rand.New(rand.NewPCG(1, 2))
	words := []string{"chunk ", "blob ", "cache ", "nydus ", "rafs ", "erofs ", "block ", "device ", "\n"}
	data := make([]byte, 0, 32<<20)
	for len(data) < 32<<20 {
		data = append(data, words[rng.IntN(len(words))]...)
		if rng.IntN(50) == 0 {
			for range 20 {
				data = append(data, byte(rng.Uint32()))
			}
		}
	}
	return data[:32<<20]
}

// benchBlob writes a blob of data in 1 MiB chunks compressed with comp,
// blake3 digests, to dir, and returns its entry and chunk table.
func benchBlob(b *testing.B, dir string, data []byte, comp rafs.Compressor) (*rafs.BlobEntry, []rafs.ChunkInfo) {
	b.Helper()
	var stored []byte
	var chunks []rafs.BlobChunk
	var table []rafs.ChunkInfo
	for i := 0; i*benchChunk < len(data); i++ {
		plain := data[i*benchChunk : min((i+1)*benchChunk, len(data))]
		enc, err := rafs.Compress(comp, nil, plain)
		if errors.Is(err, rafs.ErrNotSmaller) || comp == rafs.CompressNone {
			enc = plain
		} else if err != nil {
			b.Fatal(err)
		}
		c := rafs.BlobChunk{CompressedOffset: uint64(len(stored)), CompressedSize: uint32(len(enc)),
			UncompressedOffset: uint64(i * benchChunk), UncompressedSize: uint32(len(plain))}
		if len(enc) != len(plain) {
			c.Flags = rafs.ChunkFlagCompressed
		}
		chunks = append(chunks, c)
		table = append(table, rafs.ChunkInfo{Digest: blake3.Sum256(plain), CompressedOffset: c.CompressedOffset,
			CompressedSize: c.CompressedSize, UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize,
			Flags: c.Flags, Index: uint32(i)})
		stored = append(stored, enc...)
	}
	e := &rafs.BlobEntry{ChunkSize: benchChunk, ChunkCount: uint32(len(chunks)), Compressor: comp,
		Digester: rafs.DigestBlake3, Features: rafs.BlobFeatureAligned,
		UncompressedSize: (uint64(len(data)) + 4095) &^ 4095, CIOffset: uint64(len(stored)),
		CICompressor: rafs.CompressNone, CICompressedSize: uint64(16 * len(chunks)), CIUncompressedSize: uint64(16 * len(chunks))}
	ci := make([]byte, 16*len(chunks))
	for i, c := range chunks {
		if err := rafs.EncodeCIv1(ci[16*i:], c); err != nil {
			b.Fatal(err)
		}
	}
	stored = append(stored, ci...)
	hdr := make([]byte, rafs.BlobMetaHeaderSize)
	(&rafs.BlobMetaHeader{Magic: rafs.BlobMetaMagic, Magic2: rafs.BlobMetaMagic, Features: e.Features,
		CICompressor: e.CICompressor, CIEntries: e.ChunkCount, CIOffset: e.CIOffset,
		CICompressedSize: e.CICompressedSize, CIUncompressedSize: e.CIUncompressedSize}).Encode(hdr)
	stored = append(stored, hdr...)
	e.CompressedSize = uint64(len(stored))
	sum := sha256.Sum256(stored)
	copy(e.BlobID[:], hex.EncodeToString(sum[:]))
	if err := os.WriteFile(filepath.Join(dir, e.ID()), stored, 0o644); err != nil {
		b.Fatal(err)
	}
	return e, table
}

// BenchmarkColdRead reads a whole blob once through an empty cache:
// fetch from localfs, decompress, blake3, write. MB/s are of uncompressed
// bytes.
func BenchmarkColdRead(b *testing.B) {
	data := benchCorpus(b)
	for _, comp := range allCompressors {
		b.Run(comp.String(), func(b *testing.B) {
			blobDir := b.TempDir()
			e, table := benchBlob(b, blobDir, data, comp)
			store := localfs.New(blobDir)
			buf := make([]byte, 4<<20)
			b.SetBytes(int64(len(data)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				cache, err := blobcache.Open(filepath.Join(b.TempDir(), "c"), &blobcache.Options{FlushInterval: 1 << 40})
				if err != nil {
					b.Fatal(err)
				}
				blob, err := cache.OpenBlob(context.Background(), store, e, table)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				for off := int64(0); off < int64(len(data)); off += int64(len(buf)) {
					if _, err := blob.ReadAt(buf[:min(int64(len(buf)), int64(len(data))-off)], off); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				blob.Close()
				cache.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(len(data))/float64(e.CompressedSize), "ratio")
		})
	}
}

// BenchmarkWarmRead reads cached data in 128 KiB pieces (an NBD-sized
// request), serially and from all Ps at once.
func BenchmarkWarmRead(b *testing.B) {
	data := benchCorpus(b)
	blobDir := b.TempDir()
	e, table := benchBlob(b, blobDir, data, rafs.CompressZstd)
	cache, err := blobcache.Open(b.TempDir(), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer cache.Close()
	blob, err := cache.OpenBlob(context.Background(), localfs.New(blobDir), e, table)
	if err != nil {
		b.Fatal(err)
	}
	defer blob.Close()
	if err := blob.Fetch(context.Background(), 0, blob.Size()); err != nil {
		b.Fatal(err)
	}
	const piece = 128 << 10
	pieces := int64(len(data)) / piece
	b.Run("serial", func(b *testing.B) {
		p := make([]byte, piece)
		b.SetBytes(piece)
		for i := 0; i < b.N; i++ {
			if _, err := blob.ReadAt(p, int64(i)%pieces*piece); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetBytes(piece)
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, piece)
			rng := rand.New(rand.NewPCG(rand.Uint64(), 0))
			for pb.Next() {
				if _, err := blob.ReadAt(p, rng.Int64N(pieces)*piece); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
