package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/internal/ctxio"
	"github.com/rafsnbd/rafsnbd/internal/gzran"
	"github.com/rafsnbd/rafsnbd/internal/zstdran"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
	"github.com/rafsnbd/rafsnbd/verity"
)

// Media types of the index artifact (issue 12): an OCI 1.1 artifact whose
// subject is the image manifest.
const (
	IndexArtifactType   = "application/vnd.rafsnbd.index.v1"
	IndexConfigType     = "application/vnd.rafsnbd.index.config.v1+json"
	IndexBootstrapType  = "application/vnd.rafsnbd.bootstrap.v1+zstd"
	IndexVerityType     = "application/vnd.rafsnbd.verity.level1.v1"
	IndexGzipTableType  = "application/vnd.rafsnbd.gzip-index.v2"
	IndexGzipWindowType = "application/vnd.rafsnbd.gzip-windows.v1"
	IndexZstdTableType  = "application/vnd.rafsnbd.zstd-index.v1"
	subjectAnnotation   = "vnd.rafsnbd.index.subject"
	createdAnnotation   = "org.opencontainers.image.created"
	verityDataBlockSize = 512 // tarfs EROFS blocks: one verity data block each
	verityHashBlockSize = 4096
)

// indexFormat is the layout of the artifact's blobs that this code writes
// and reads: 2 stores each gzip table's windows in a blob of their own, so
// that a reader fetches a window when it first needs it (format 1, before
// the config said, fetched every table whole).
const indexFormat = 2

// IndexOptions control Index.
type IndexOptions struct {
	Platform     string // default DefaultPlatform()
	Insecure     bool
	Keychain     authn.Keychain
	Span         int64         // checkpoint span (0: gzran.DefaultSpan)
	VerityCompat verity.Compat // must match the convert --verity-compat it is compared with
	TempDir      string        // for the tar header skeletons (default os.TempDir())
	// Prefetch is stored in the index: what readers fetch first. Its
	// files must exist in the image.
	Prefetch *IndexPrefetch
}

// IndexConfig is the artifact's config blob: what the read side needs
// besides the blobs it names.
type IndexConfig struct {
	// Format is indexFormat; an artifact of another format is not reused
	// by index nor read.
	Format   int          `json:"format"`
	Manifest string       `json:"manifest"` // the image manifest digest (the subject)
	Span     int64        `json:"span"`
	Verity   IndexVerity  `json:"verity"`
	Layers   []IndexLayer `json:"layers"`
	// Prefetch is what a reader of the image fetches first.
	Prefetch *IndexPrefetch `json:"prefetch,omitempty"`
}

// IndexPrefetch says what to fetch first when the image is served
// (index --prefetch-files and --prefetch-trace): files by path (every
// regular file below a directory), and byte ranges of the merged device
// that a recorded workload read.
type IndexPrefetch struct {
	Files  []string      `json:"files,omitempty"`
	Ranges []DeviceRange `json:"ranges,omitempty"`
}

// DeviceRange is a byte range of the merged image device.
type DeviceRange struct {
	Off int64 `json:"off"`
	Len int64 `json:"len"`
}

// empty reports whether p says nothing.
func (p *IndexPrefetch) empty() bool { return p == nil || len(p.Files) == 0 && len(p.Ranges) == 0 }

// IndexVerity describes the dm-verity tree of the merged image disk (the
// disk convert --export image --verity writes). The artifact holds the
// digests of its level-0 hash blocks (one per 64 KiB of disk); the level-0
// blocks themselves are recomputed from the data they cover when it is
// read, which is what lets reads be verified.
type IndexVerity struct {
	RootHash   string `json:"root_hash"`
	Compat     string `json:"compat"`
	DataBlocks uint64 `json:"data_blocks"`
	HashOffset uint64 `json:"hash_offset"`
}

// IndexLayer is one layer of the image.
type IndexLayer struct {
	Digest           string `json:"digest"`
	DiffID           string `json:"diff_id"`
	MediaType        string `json:"media_type"`
	Size             int64  `json:"size"`
	UncompressedSize int64  `json:"uncompressed_size"`
	// Table is the artifact layer holding the checkpoint table (gzip or
	// zstd, as MediaType says), and Windows the one holding a gzip table's
	// checkpoints' windows (read by range, a window when a reader first
	// resumes at its checkpoint; -1 for zstd, whose checkpoints are frame
	// starts); both -1 for an uncompressed layer (read directly).
	Table   int `json:"table"`
	Windows int `json:"windows"`
}

// IndexResult is what Index did.
type IndexResult struct {
	Ref            string `json:"ref"`
	ManifestDigest string `json:"manifest_digest"`
	ArtifactDigest string `json:"artifact_digest"`
	RootHash       string `json:"root_hash"`
	Reused         bool   `json:"reused"`
	ArtifactSize   int64  `json:"artifact_bytes"` // manifest, config and blobs
	ImageSize      int64  `json:"image_bytes"`    // compressed layers
}

// Index makes the lazy-read index of the image ref names and publishes it
// next to the image: pushed to its repository as a referrer of the image
// manifest, or written into its OCI layout. Each layer is read once as a
// stream and never stored: its tar headers go to a sparse skeleton file
// (data left as holes) that build.FromTar indexes as convert would; the
// uncompressed bytes are hashed for the diff_id and in 512-byte verity
// blocks as they pass. An image indexed before is left alone (Reused).
func Index(ctx context.Context, ref string, opts IndexOptions) (*IndexResult, error) {
	src, img, err := openResolved(ctx, ref, opts.Platform, sourceOptions{insecure: opts.Insecure, keychain: opts.Keychain, stall: DefaultStallTimeout})
	if err != nil {
		return nil, err
	}
	pub, err := newPublisher(src, opts)
	if err != nil {
		return nil, err
	}
	res := &IndexResult{Ref: img.source, ManifestDigest: img.manifestDigest.String()}
	for _, l := range img.layers {
		res.ImageSize += l.size
	}
	span := opts.Span
	if span <= 0 {
		span = gzran.DefaultSpan
	}
	if opts.Prefetch.empty() {
		opts.Prefetch = nil
	}
	want := artifactKey{format: indexFormat, span: span, compat: opts.VerityCompat.String(), prefetch: prefetchKey(opts.Prefetch)}
	if found, err := pub.find(ctx, img.manifestDigest, want); err != nil {
		return nil, fmt.Errorf("oci: %s: looking for an index: %w", img.source, err)
	} else if found != nil {
		res.Reused, res.ArtifactDigest, res.RootHash, res.ArtifactSize = true, found.digest, found.root, found.size
		return res, nil
	}

	tmp, err := os.MkdirTemp(opts.TempDir, "rafsnbd-index-")
	if err != nil {
		return nil, fmt.Errorf("oci: %w", err)
	}
	defer os.RemoveAll(tmp)
	var removals sync.WaitGroup
	defer removals.Wait() // before RemoveAll
	cfg := IndexConfig{Format: indexFormat, Manifest: img.manifestDigest.String(), Span: span, Prefetch: opts.Prefetch}
	var blobs []artifactBlob
	leaves := make(map[string][][]byte) // diff_id hex → digests of its 512-byte blocks, in chunks
	boots := make([]string, len(img.layers))
	names := make([]string, len(img.layers))
	// Each layer's bootstrap is built (and its skeleton removed, which can
	// take a while on a filesystem that discards freed blocks) while the
	// next layer streams.
	builds, bctx := errgroup.WithContext(ctx)
	builds.SetLimit(1)
	for i, l := range img.layers {
		il, tables, leaf, buildBoot, err := indexLayer(ctx, src, l, cfg.Span, tmp, &removals)
		if err != nil {
			builds.Wait()
			return nil, fmt.Errorf("oci: layer %d (%s): %w", l.index, l.digest, err)
		}
		builds.Go(func() error {
			if err := buildBoot(bctx); err != nil {
				return fmt.Errorf("oci: layer %d (%s): %w", l.index, l.digest, err)
			}
			return nil
		})
		il.Table, il.Windows = -1, -1
		for _, b := range tables {
			at := 2 + len(blobs) // after the bootstrap and the verity digests
			if b.mt == IndexGzipWindowType {
				il.Windows = at
			} else {
				il.Table = at
			}
			blobs = append(blobs, b)
		}
		cfg.Layers = append(cfg.Layers, *il)
		leaves[l.diffID.Hex] = leaf
		boots[i] = filepath.Join(tmp, l.diffID.Hex+".boot")
		names[i] = fmt.Sprintf("layer %d (%s)", i, l.digest)
	}
	if err := builds.Wait(); err != nil {
		return nil, err
	}
	var merged bytes.Buffer
	if _, err := build.MergeFiles(ctx, boots, &merged, build.MergeOptions{Names: names}); err != nil {
		return nil, fmt.Errorf("oci: %s: %w", img.source, err)
	}
	if err := checkPrefetchFiles(merged.Bytes(), opts.Prefetch); err != nil {
		return nil, fmt.Errorf("oci: %s: %w", img.source, err)
	}
	vt, level1, err := mergedVerity(merged.Bytes(), leaves, opts.VerityCompat)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: %w", img.source, err)
	}
	cfg.Verity = *vt
	zboot, err := zstdBytes(merged.Bytes())
	if err != nil {
		return nil, err
	}
	blobs = append([]artifactBlob{{mt: IndexBootstrapType, data: zboot}, {mt: IndexVerityType, data: level1}}, blobs...)
	rawCfg, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	// The subject descriptor wants the manifest's size and media type.
	rawM, mt, err := src.manifest(ctx, img.manifestDigest, DefaultMaxManifestSize)
	if err != nil {
		return nil, err
	}
	if mt == "" {
		if mt, err = sniffMediaType(rawM, ""); err != nil {
			return nil, err
		}
	}
	subject := v1.Descriptor{MediaType: mt, Size: int64(len(rawM)), Digest: img.manifestDigest}
	art, err := pub.publish(ctx, subject, rawCfg, blobs)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: publishing the index: %w", img.source, err)
	}
	res.ArtifactDigest, res.RootHash, res.ArtifactSize = art.digest, vt.RootHash, art.size
	return res, nil
}

func zstdBytes(b []byte) ([]byte, error) {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	defer e.Close()
	return e.EncodeAll(b, nil), nil
}

// indexLayer streams one layer: it checks the blob's digest and the tar's
// diff_id, records gzip or zstd checkpoints (returned as the artifact
// blobs of the layer's table: none for an uncompressed layer), writes the
// tar's headers into a sparse skeleton, and returns the sha256 of every
// 512-byte block of the tar (in chunks) and buildBoot, which builds the
// layer bootstrap (dir/<diffid>.boot) from the skeleton and removes it in
// the background (counted in removals); buildBoot must be called once when
// err is nil.
func indexLayer(ctx context.Context, src source, l layerDesc, span int64, dir string, removals *sync.WaitGroup) (_ *IndexLayer, tables []artifactBlob, _ [][]byte, buildBoot func(context.Context) error, err error) {
	il, tables, leaves, skel, err := streamLayer(ctx, src, l, span, dir)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	buildBoot = func(ctx context.Context) error {
		// Freeing the skeleton's blocks is slow where the filesystem
		// discards them (FromTar fsyncs the blob it places, so they are
		// allocated); it runs beside the work that follows.
		defer func() {
			removals.Add(1)
			go func() {
				defer removals.Done()
				skel.Close()
				os.Remove(skel.Name())
				os.Remove(filepath.Join(dir, "blobs", l.diffID.Hex)) // the skeleton, linked in
			}()
		}()
		boot, err := os.Create(filepath.Join(dir, l.diffID.Hex+".boot"))
		if err != nil {
			return err
		}
		defer boot.Close()
		bopts := build.DefaultOptions(filepath.Join(dir, "blobs"))
		bopts.BlobID = l.diffID.Hex
		if _, err := build.FromTar(ctx, skel, boot, bopts); err != nil {
			return err
		}
		return boot.Close()
	}
	return il, tables, leaves, buildBoot, nil
}

// streamLayer is indexLayer's pass over the layer's bytes. It returns the
// skeleton, truncated to the tar's size, open.
func streamLayer(ctx context.Context, src source, l layerDesc, span int64, dir string) (_ *IndexLayer, _ []artifactBlob, _ [][]byte, _ *os.File, err error) {
	rc, err := src.blob(ctx, l.digest)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	defer rc.Close()
	blobHash := newPipedSHA256()
	defer blobHash.close()
	dl := &downloadReader{r: ctxio.NewReader(ctx, rc), h: blobHash, limit: l.size}
	var (
		stream io.Reader
		gz     *gzran.Indexer
		zs     *zstdran.Indexer
	)
	switch l.mediaType {
	case types.OCILayer, types.OCIRestrictedLayer, types.DockerLayer, types.DockerForeignLayer:
		gz = gzran.NewIndexer(dl, span)
		stream = gz
	case types.OCIUncompressedLayer, types.OCIUncompressedRestrictedLayer, types.DockerUncompressedLayer:
		stream = dl
	case types.OCILayerZStd:
		zs = zstdran.NewIndexer(dl, span)
		defer zs.Close()
		stream = zs
	default:
		return nil, nil, nil, nil, fmt.Errorf("unsupported layer media type %q", l.mediaType)
	}
	skel, err := os.CreateTemp(dir, "skeleton-")
	if err != nil {
		return nil, nil, nil, nil, err
	}
	defer func() {
		if err != nil {
			skel.Close()
			os.Remove(skel.Name())
		}
	}()
	diffHash, leaves := newPipedSHA256(), newLeafHasher()
	defer func() { diffHash.close(); leaves.leaves() }()
	ls := &layerStream{r: stream, h: diffHash, leaves: leaves, skel: skel}
	tr := tar.NewReader(ls)
	buf := make([]byte, 256<<10) // io.Copy to io.Discard would read 8 KiB at a time
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil && !errors.Is(err, tar.ErrInsecurePath) {
			return nil, nil, nil, nil, fmt.Errorf("tar: %w", err) // build.FromTar would refuse it too
		}
		if hdr.Typeflag == tar.TypeReg {
			ls.data = true
			err = discard(tr, buf)
			ls.data = false
			if err != nil {
				return nil, nil, nil, nil, err
			}
		}
	}
	if err := discard(ls, buf); err != nil { // what follows the tar's end counts too
		return nil, nil, nil, nil, err
	}
	if ls.err != nil {
		return nil, nil, nil, nil, ls.err
	}
	if extra, err := io.Copy(io.Discard, dl); err != nil {
		return nil, nil, nil, nil, err
	} else if extra > 0 {
		return nil, nil, nil, nil, fmt.Errorf("%d bytes of garbage after the compressed stream", extra)
	}
	if dl.n != l.size {
		return nil, nil, nil, nil, fmt.Errorf("the blob has %d bytes, its descriptor %d", dl.n, l.size)
	}
	if got := v1Hash(dl.h); got != l.digest.String() {
		return nil, nil, nil, nil, fmt.Errorf("content digest %s does not match the descriptor", got)
	}
	if got := v1Hash(diffHash); got != l.diffID.String() {
		return nil, nil, nil, nil, fmt.Errorf("uncompressed content digest %s does not match the config's diff_id %s", got, l.diffID)
	}
	if err := skel.Truncate(ls.n); err != nil {
		return nil, nil, nil, nil, err
	}
	il := &IndexLayer{Digest: l.digest.String(), DiffID: l.diffID.String(), MediaType: string(l.mediaType),
		Size: l.size, UncompressedSize: ls.n}
	var tables []artifactBlob
	switch {
	case gz != nil:
		table, err := gz.Index()
		if err != nil {
			return nil, nil, nil, nil, err
		}
		raw, err := table.MarshalBinary()
		if err != nil {
			return nil, nil, nil, nil, err
		}
		tables = []artifactBlob{{mt: IndexGzipTableType, data: raw}, {mt: IndexGzipWindowType, data: table.Windows()}}
	case zs != nil:
		table, err := zs.Index()
		if err != nil {
			return nil, nil, nil, nil, err
		}
		if err := zstdLazy(table); err != nil {
			return nil, nil, nil, nil, err
		}
		raw, err := table.MarshalBinary()
		if err != nil {
			return nil, nil, nil, nil, err
		}
		tables = []artifactBlob{{mt: IndexZstdTableType, data: raw}}
	}
	return il, tables, leaves.leaves(), skel, nil
}

// zstdLazy checks that a zstd layer can be read by range: a zstd decoder
// resumes only at a frame start, so a layer of one frame (what `zstd` and
// most image builders write) would be decoded from its start for every
// read, and a layer with frames larger than blobcache.MaxZstdSpan would
// make every read decode and hold that much.
func zstdLazy(idx *zstdran.Index) error {
	cps := idx.Checkpoints
	if (idx.Frames <= 1 || len(cps) == 1) && idx.UncompressedSize > idx.Span {
		return errors.New("a zstd layer of one frame cannot be read lazily (recompress it in frames, e.g. zstd:chunked, or use rafsnbd convert)")
	}
	if n, at := idx.LargestSpan(); n > blobcache.MaxZstdSpan {
		return fmt.Errorf("a zstd layer cannot be read lazily with %d bytes between checkpoints (from offset %d; at most %d MiB: recompress it in smaller frames, index it with a smaller span, or use rafsnbd convert)",
			n, at, blobcache.MaxZstdSpan>>20)
	}
	return nil
}

// discard reads r to its end through buf.
func discard(r io.Reader, buf []byte) error {
	for {
		_, err := r.Read(buf)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// layerStream passes a layer's uncompressed bytes to the tar reader,
// handing them to the hashes (diff_id, and sha256 of each 512-byte verity
// block; each on its own goroutine) and copying everything but regular
// files' data into the skeleton file at its offset.
type layerStream struct {
	r      io.Reader
	h      io.Writer
	leaves io.Writer
	skel   *os.File
	data   bool // inside a regular file's data: not copied
	n      int64
	err    error
}

func (s *layerStream) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	b := p[:n]
	s.h.Write(b)
	s.leaves.Write(b)
	if !s.data && n > 0 && s.err == nil {
		if _, werr := s.skel.WriteAt(b, s.n); werr != nil {
			s.err = werr
		}
	}
	s.n += int64(n)
	return n, err
}

// mergedVerity computes the verity tree of the merged image disk (the
// bootstrap's blocks, then each layer tar at its mapped block address,
// zeros between, as blockdev.Compose lays it out) from the layers' block
// digests. It returns the tree's description and the digests of its
// level-0 hash blocks. The digests are packed into level-0 blocks as they
// come: nothing the size of the disk's digests is built.
func mergedVerity(boot []byte, leaves map[string][][]byte, compat verity.Compat) (*IndexVerity, []byte, error) {
	ri, err := rafs.NewImage(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		return nil, nil, err
	}
	bs := uint64(ri.BlockSize)
	if bs != verityDataBlockSize || uint64(len(boot))%bs != 0 {
		return nil, nil, fmt.Errorf("merged bootstrap: %d-byte blocks, %d bytes: not a tarfs image", bs, len(boot))
	}
	fill := make([]byte, sha256.Size)
	if compat == verity.NydusCompat {
		f := sha256.Sum256(make([]byte, 4096))
		fill = f[:]
	}
	l0 := &level0Packer{fill: fill}
	zero := sha256.Sum256(make([]byte, verityDataBlockSize))
	l0.add(verity.SumBlocks(nil, boot, verityDataBlockSize))
	end := uint64(len(boot)) / bs
	for i := range ri.Blobs {
		e := &ri.Blobs[i]
		addr := uint64(ri.DeviceSlots[i].MappedBlkAddr)
		if addr < end {
			return nil, nil, fmt.Errorf("merged bootstrap: blob %d maps inside the previous range", i)
		}
		for ; end < addr; end++ {
			l0.add(zero[:])
		}
		chunks, ok := leaves[e.ID()]
		want := e.UncompressedSize / bs * sha256.Size
		var have uint64
		for _, c := range chunks {
			have += uint64(len(c))
		}
		if !ok || have < want {
			return nil, nil, fmt.Errorf("merged bootstrap: blob %d (%s) is not a layer of the image", i, e.ID())
		}
		for _, c := range chunks {
			c = c[:min(uint64(len(c)), want)]
			l0.add(c)
			want -= uint64(len(c))
		}
		end += e.UncompressedSize / bs
	}
	p := verity.NydusParams(end*bs, verityDataBlockSize)
	p.Compat = compat
	if err := p.Validate(); err != nil {
		return nil, nil, err
	}
	level1 := l0.finish()
	root := rootOf(level1, fill)
	return &IndexVerity{RootHash: hex.EncodeToString(root), Compat: compat.String(), DataBlocks: p.DataBlocks, HashOffset: p.HashOffset}, level1, nil
}

// level0Packer packs data-block digests into level-0 hash blocks (as
// hashBlocks does) as they come and keeps only each block's digest.
type level0Packer struct {
	fill   []byte
	block  [verityHashBlockSize]byte
	used   int
	level1 []byte
}

func (p *level0Packer) add(digests []byte) {
	per := verityHashBlockSize / len(p.fill) * len(p.fill)
	for len(digests) > 0 {
		c := copy(p.block[p.used:per], digests)
		p.used += c
		digests = digests[c:]
		if p.used == per {
			p.flush()
		}
	}
}

func (p *level0Packer) flush() {
	for n := p.used; n+len(p.fill) <= len(p.block); n += len(p.fill) {
		copy(p.block[n:], p.fill)
	}
	d := sha256.Sum256(p.block[:])
	p.level1 = append(p.level1, d[:]...)
	p.used = 0
}

// finish packs the last partial block and returns the level-1 digests.
func (p *level0Packer) finish() []byte {
	if p.used > 0 {
		p.flush()
	}
	return p.level1
}

// hashBlocks packs digests into hash blocks, filling unused slots.
func hashBlocks(digests, fill []byte) [][]byte {
	per := verityHashBlockSize / len(fill) * len(fill)
	var out [][]byte
	for off := 0; off < len(digests); off += per {
		b := make([]byte, verityHashBlockSize)
		n := copy(b, digests[off:min(off+per, len(digests))])
		for ; n+len(fill) <= len(b); n += len(fill) {
			copy(b[n:], fill)
		}
		out = append(out, b)
	}
	return out
}

// rootOf is the root hash of a tree whose level above the data blocks has
// the given digests (one per block below): levels are added until one
// hash block holds them all; the root is that block's hash.
func rootOf(digests, fill []byte) []byte {
	for {
		blocks := hashBlocks(digests, fill)
		if len(blocks) == 1 {
			d := sha256.Sum256(blocks[0])
			return d[:]
		}
		digests = digests[:0:0]
		for _, b := range blocks {
			d := sha256.Sum256(b)
			digests = append(digests, d[:]...)
		}
	}
}

// checkPrefetchFiles checks that the prefetch list's files are in the
// merged image, so that a typo is an error of index, not of every serve.
func checkPrefetchFiles(boot []byte, p *IndexPrefetch) error {
	if p == nil || len(p.Files) == 0 {
		return nil
	}
	ri, err := rafs.NewImage(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		return err
	}
	defer ri.Close()
	for _, f := range p.Files {
		if _, err := ri.Lookup(f); err != nil {
			return fmt.Errorf("prefetch file %q: %w", f, err)
		}
	}
	return nil
}

// ---------------------------------------------------------------------------
// Publishing

// artifactKey is what makes two indexes of one image the same.
type artifactKey struct {
	format   int
	span     int64
	compat   string
	prefetch string
}

func prefetchKey(p *IndexPrefetch) string {
	if p.empty() {
		return ""
	}
	b, _ := json.Marshal(p)
	return string(b)
}

type artifactBlob struct {
	mt   string
	data []byte
}

type foundArtifact struct {
	digest, root string
	size         int64
}

type publisher interface {
	// find returns the artifact for subject made with the same span,
	// verity compat and prefetch list, or nil.
	find(ctx context.Context, subject v1.Hash, want artifactKey) (*foundArtifact, error)
	publish(ctx context.Context, subject v1.Descriptor, config []byte, blobs []artifactBlob) (*foundArtifact, error)
}

func newPublisher(src source, opts IndexOptions) (publisher, error) {
	switch s := src.(type) {
	case *registrySource:
		kc := opts.Keychain
		if kc == nil {
			kc = authn.DefaultKeychain
		}
		return &registryPublisher{repo: s.ref.Context(), opts: []remote.Option{remote.WithAuthFromKeychain(kc)}}, nil
	case *layoutSource:
		return &layoutPublisher{dir: s.dir}, nil
	}
	return nil, fmt.Errorf("oci: cannot publish an index to %s", src.canonical())
}

// artifactManifest makes the artifact's manifest: an OCI image manifest
// with artifactType, config and blobs, and the image as subject.
func artifactManifest(subject v1.Descriptor, config []byte, blobs []artifactBlob) ([]byte, int64, error) {
	m := v1.Manifest{
		SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config:  v1.Descriptor{MediaType: IndexConfigType, Size: int64(len(config)), Digest: sha256Hash(config)},
		Subject: &subject,
		// Readers take the newest index of an image (one with another
		// prefetch list supersedes it); referrers lists carry manifest
		// annotations, in no useful order (the fallback tag sorts by
		// digest).
		Annotations: map[string]string{createdAnnotation: time.Now().UTC().Format("2006-01-02T15:04:05.000000000Z")}, // fixed width: sorts as text
	}
	size := int64(len(config))
	for _, b := range blobs {
		m.Layers = append(m.Layers, v1.Descriptor{MediaType: types.MediaType(b.mt), Size: int64(len(b.data)), Digest: sha256Hash(b.data)})
		size += int64(len(b.data))
	}
	raw, err := json.Marshal(struct {
		v1.Manifest
		ArtifactType string `json:"artifactType"`
	}{m, IndexArtifactType})
	return raw, size + int64(len(raw)), err
}

type rawManifest struct{ raw []byte }

func (r rawManifest) RawManifest() ([]byte, error)        { return r.raw, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// wantedArtifact describes index artifact img, and returns it when it was
// made with the parameters want asks for (nil when not).
func wantedArtifact(img v1.Image, digest v1.Hash, want artifactKey) (*foundArtifact, error) {
	found, cfg, err := describeArtifact(img, digest)
	if err != nil || (artifactKey{cfg.Format, cfg.Span, cfg.Verity.Compat, prefetchKey(cfg.Prefetch)}) != want {
		return nil, err
	}
	return found, nil
}

type registryPublisher struct {
	repo name.Repository
	opts []remote.Option
}

func (p *registryPublisher) find(ctx context.Context, subject v1.Hash, want artifactKey) (*foundArtifact, error) {
	opts := append([]remote.Option{remote.WithContext(ctx), remote.WithFilter("artifactType", IndexArtifactType)}, p.opts...)
	idx, err := remote.Referrers(p.repo.Digest(subject.String()), opts...)
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	for _, d := range im.Manifests {
		if d.ArtifactType != IndexArtifactType {
			continue
		}
		img, err := remote.Image(p.repo.Digest(d.Digest.String()), opts...)
		if err != nil {
			return nil, err
		}
		if found, err := wantedArtifact(img, d.Digest, want); err != nil || found != nil {
			return found, err
		}
	}
	return nil, nil
}

// describeArtifact reads an artifact's root hash and size.
func describeArtifact(img v1.Image, d v1.Hash) (*foundArtifact, *IndexConfig, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, nil, err
	}
	raw, err := img.RawConfigFile()
	if err != nil {
		return nil, nil, err
	}
	var cfg IndexConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, nil, fmt.Errorf("index artifact %s: config: %w", d, err)
	}
	rawM, err := img.RawManifest()
	if err != nil {
		return nil, nil, err
	}
	size := int64(len(rawM)) + m.Config.Size
	for _, l := range m.Layers {
		size += l.Size
	}
	return &foundArtifact{digest: d.String(), root: cfg.Verity.RootHash, size: size}, &cfg, nil
}

func (p *registryPublisher) publish(ctx context.Context, subject v1.Descriptor, config []byte, blobs []artifactBlob) (*foundArtifact, error) {
	opts := append([]remote.Option{remote.WithContext(ctx)}, p.opts...)
	for _, b := range append([]artifactBlob{{mt: IndexConfigType, data: config}}, blobs...) {
		if err := remote.WriteLayer(p.repo, static.NewLayer(b.data, types.MediaType(b.mt)), opts...); err != nil {
			return nil, err
		}
	}
	raw, size, err := artifactManifest(subject, config, blobs)
	if err != nil {
		return nil, err
	}
	d := sha256Hash(raw)
	// go-containerregistry updates the sha256-<hex> fallback tag when the
	// registry does not answer with OCI-Subject (no referrers API).
	if err := remote.Put(p.repo.Digest(d.String()), rawManifest{raw}, opts...); err != nil {
		return nil, err
	}
	return &foundArtifact{digest: d.String(), size: size}, nil
}

type layoutPublisher struct{ dir string }

func (p *layoutPublisher) find(ctx context.Context, subject v1.Hash, want artifactKey) (*foundArtifact, error) {
	lp, err := layout.FromPath(p.dir)
	if err != nil {
		return nil, err
	}
	ii, err := lp.ImageIndex()
	if err != nil {
		return nil, err
	}
	im, err := ii.IndexManifest()
	if err != nil {
		return nil, err
	}
	for _, d := range im.Manifests {
		if d.ArtifactType != IndexArtifactType || d.Annotations[subjectAnnotation] != subject.String() {
			continue
		}
		img, err := lp.Image(d.Digest)
		if err != nil {
			return nil, err
		}
		if found, err := wantedArtifact(img, d.Digest, want); err != nil || found != nil {
			return found, err
		}
	}
	return nil, nil
}

func (p *layoutPublisher) publish(ctx context.Context, subject v1.Descriptor, config []byte, blobs []artifactBlob) (*foundArtifact, error) {
	lp, err := layout.FromPath(p.dir)
	if err != nil {
		return nil, err
	}
	for _, b := range append([]artifactBlob{{mt: IndexConfigType, data: config}}, blobs...) {
		if err := lp.WriteBlob(sha256Hash(b.data), io.NopCloser(bytes.NewReader(b.data))); err != nil {
			return nil, err
		}
	}
	raw, size, err := artifactManifest(subject, config, blobs)
	if err != nil {
		return nil, err
	}
	d := sha256Hash(raw)
	if err := lp.WriteBlob(d, io.NopCloser(bytes.NewReader(raw))); err != nil {
		return nil, err
	}
	// The manifest goes into index.json last: only then is the index found.
	var created struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(raw, &created); err != nil {
		return nil, err
	}
	err = lp.AppendDescriptor(v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: int64(len(raw)), Digest: d,
		ArtifactType: IndexArtifactType, Annotations: map[string]string{subjectAnnotation: subject.Digest.String(),
			createdAnnotation: created.Annotations[createdAnnotation]}})
	if err != nil {
		return nil, err
	}
	return &foundArtifact{digest: d.String(), size: size}, nil
}
