package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/rs/zerolog"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/ctxio"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// decompressor opens the uncompressed stream of a layer blob.
type decompressor func(io.Reader) (io.ReadCloser, error)

// decompressorFor picks the decompression a layer's media type says; the
// decoders are build's, which also reads compressed tars given to create.
func decompressorFor(mt types.MediaType) (decompressor, error) {
	var c build.Compression
	switch mt {
	case types.OCILayer, types.OCIRestrictedLayer, types.DockerLayer, types.DockerForeignLayer:
		c = build.Gzip
	case types.OCILayerZStd:
		c = build.Zstd
	case types.OCIUncompressedLayer, types.OCIUncompressedRestrictedLayer, types.DockerUncompressedLayer:
		c = build.Uncompressed
	default:
		return nil, fmt.Errorf("unsupported layer media type %q", mt)
	}
	return func(r io.Reader) (io.ReadCloser, error) { return build.NewDecompressReader(c, r) }, nil
}

// downloadReader checks a blob stream against its descriptor while it is
// read: never more bytes than the descriptor's size, sha256 of everything,
// time spent waiting for the source.
type downloadReader struct {
	r        io.Reader
	h        hash.Hash
	n, limit int64
	wait     time.Duration
	progress func(done int64)
}

func (d *downloadReader) Read(p []byte) (int, error) {
	start := time.Now()
	n, err := d.r.Read(p)
	d.wait += time.Since(start)
	if d.n+int64(n) > d.limit {
		n = int(d.limit - d.n)
		err = fmt.Errorf("the blob is longer than the %d bytes its descriptor gives", d.limit)
	}
	d.h.Write(p[:n])
	d.n += int64(n)
	if n > 0 && d.progress != nil {
		d.progress(d.n)
	}
	return n, err
}

// hashWriter hashes what goes through it.
type hashWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (w *hashWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	return n, err
}

// spaceCheckInterval is how often a long write looks at the free space.
const spaceCheckInterval = 64 << 20

// convertLayer makes layers/<diffid>.boot and blobs/<diffid> for one layer,
// or finds them done. It holds the layer's lock throughout, so a layer
// shared by images converted at once is pulled once.
func (cv *converter) convertLayer(ctx context.Context, l layerDesc) (*LayerResult, error) {
	log := zerolog.Ctx(ctx)
	id := l.diffID.Hex
	res := &LayerResult{Index: l.index, Digest: l.digest.String(), DiffID: l.diffID.String(),
		MediaType: string(l.mediaType), Size: l.size, Bootstrap: cv.cache.layerBoot(id), Blob: cv.cache.blobPath(id)}
	what := fmt.Sprintf("oci: layer %d (%s)", l.index, l.digest)
	unlock, err := cv.cache.lock(ctx, "layer", id, func() {
		log.Info().Int("layer", l.index).Str("diff_id", l.diffID.String()).Msg("waiting for another conversion of this layer")
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer unlock()

	staging := cv.cache.stagingDir(id)
	if size, ok := cv.layerDone(id); ok {
		os.RemoveAll(staging) // a run stopped right after publishing
		res.Reused, res.TarSize = true, size
		cv.report(Progress{Layer: l.index, Digest: res.Digest, Phase: PhaseReused, Done: l.size, Total: l.size})
		return res, nil
	}

	if err := os.RemoveAll(staging); err != nil { // an interrupted run's leftovers
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := os.MkdirAll(staging, cacheDirMode); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer os.RemoveAll(staging)

	tar, err := cv.existingTar(ctx, l)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if tar != nil {
		res.TarReused = true
		log.Debug().Int("layer", l.index).Msg("tar already in the cache, indexing it again")
	} else {
		if tar, err = cv.pullLayer(ctx, l, filepath.Join(staging, "layer.tar"), res); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	defer tar.Close()
	st, err := tar.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	res.TarSize = st.Size()

	// Index the tar. The builder places it in the staging directory under
	// its id (a hard link, no copy) next to the bootstrap.
	cv.report(Progress{Layer: l.index, Digest: res.Digest, Phase: PhaseBuild, Total: res.TarSize})
	start := time.Now()
	bootTmp := filepath.Join(staging, "layer.boot")
	bf, err := os.OpenFile(bootTmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, cacheFileMode)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer bf.Close()
	opts := build.DefaultOptions(staging)
	opts.BlobID = id
	opts.BlobMode = cacheFileMode // a reflinked copy is ours; the cache is not world-readable
	if _, err := build.FromTar(ctx, tar, bf, opts); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := bf.Sync(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	res.Build = time.Since(start)

	// Publish: the tar first, the bootstrap last (it marks the layer done).
	// Both were synced in staging; CommitName syncs again (cheap then) so
	// that every output goes through the one checked, synced rename.
	if err := atomicfile.CommitName(filepath.Join(staging, id), res.Blob); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := atomicfile.CommitName(bootTmp, res.Bootstrap); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	cv.report(Progress{Layer: l.index, Digest: res.Digest, Phase: PhaseLayerDone, Done: res.TarSize, Total: res.TarSize})
	log.Debug().Int("layer", l.index).Str("diff_id", res.DiffID).Int64("tar_bytes", res.TarSize).
		Dur("download", res.Download).Dur("decompress", res.Decompress).Dur("build", res.Build).Msg("layer converted")
	return res, nil
}

// layerDone reports whether a layer's bootstrap and tar are in the cache,
// and the tar's size. The bootstrap is published last, so its presence
// means the tar was complete; the size check catches a tar replaced or
// cut since.
func (cv *converter) layerDone(id string) (int64, bool) {
	img, err := rafs.Open(cv.cache.layerBoot(id))
	if err != nil {
		return 0, false
	}
	defer img.Close()
	if !img.IsTarfs() || len(img.Blobs) != 1 || img.Blobs[0].ID() != id {
		return 0, false
	}
	st, err := os.Stat(cv.cache.blobPath(id))
	if err != nil || !st.Mode().IsRegular() || uint64(st.Size()) != img.Blobs[0].CompressedSize {
		return 0, false
	}
	return st.Size(), true
}

// existingTar returns the cached tar of a layer whose bootstrap is missing
// (a run stopped between publishing the two), once its sha256 is checked
// against the diff_id; nil when there is none or it does not match.
func (cv *converter) existingTar(ctx context.Context, l layerDesc) (*os.File, error) {
	p := cv.cache.blobPath(l.diffID.Hex)
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	_, err = io.CopyBuffer(h, ctxio.NewReader(ctx, f), make([]byte, 1<<20))
	if err == nil && hex.EncodeToString(h.Sum(nil)) == l.diffID.Hex {
		return f, nil
	}
	f.Close()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// A bad or unreadable leftover: pull the layer again.
	os.Remove(p)
	return nil, nil
}

// pullLayer downloads a layer, checks its digest and size, and decompresses
// it into tarPath, checking the tar's sha256 against the diff_id. The
// returned file is synced.
func (cv *converter) pullLayer(ctx context.Context, l layerDesc, tarPath string, res *LayerResult) (*os.File, error) {
	if err := needSpace(cv.cache.blobDir(), l.size, cv.opts.ReserveBytes, "the layer"); err != nil {
		return nil, err
	}
	dec, err := decompressorFor(l.mediaType)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	rc, err := cv.src.blob(ctx, l.digest)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	dl := &downloadReader{r: ctxio.NewReader(ctx, rc), h: sha256.New(), limit: l.size,
		progress: func(done int64) {
			cv.report(Progress{Layer: l.index, Digest: l.digest.String(), Phase: PhaseDownload, Done: done, Total: l.size})
		}}

	f, err := os.OpenFile(tarPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, cacheFileMode)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	out := &hashWriter{w: &spaceWatcher{f: f, dir: cv.cache.blobDir(), reserve: cv.opts.ReserveBytes, interval: spaceCheckInterval}, h: sha256.New()}
	zr, err := dec(dl)
	if err == nil {
		_, err = io.CopyBuffer(out, zr, make([]byte, 1<<20))
		if cerr := zr.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		// The decompressor may stop before the end of the blob; the rest
		// still counts for the digest (and must not be there at all).
		var extra int64
		extra, err = io.Copy(io.Discard, dl)
		if err == nil && extra > 0 {
			err = fmt.Errorf("%d bytes of garbage after the compressed stream", extra)
		}
	}
	got := v1Hash(dl.h)
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case dl.n == l.size && got != l.digest.String():
		// A wrong digest explains any decompression error it caused.
		return nil, fmt.Errorf("content digest %s does not match the descriptor", got)
	case err != nil:
		return nil, fmt.Errorf("after %d of %d bytes: %w", dl.n, l.size, err)
	case dl.n != l.size:
		return nil, fmt.Errorf("the blob has %d bytes, its descriptor %d", dl.n, l.size)
	case got != l.digest.String():
		return nil, fmt.Errorf("content digest %s does not match the descriptor", got)
	}
	if tarSum := v1Hash(out.h); tarSum != l.diffID.String() {
		return nil, fmt.Errorf("uncompressed content digest %s does not match the config's diff_id %s", tarSum, l.diffID)
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	res.Download = dl.wait
	res.Decompress = time.Since(start) - dl.wait
	ok = true
	return f, nil
}

func v1Hash(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }
