package build

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// priorChunks are the chunks of the blobs earlier layers of an image
// wrote, by digest.
type priorChunks struct {
	blobs  []rafs.BlobInfo
	chunks map[[32]byte]priorChunk
}

type priorChunk struct {
	blob int
	ci   uint32
	uoff uint64
}

// ownIndex is the blob index of the blob being written: after every
// earlier layer's blob (0 outside a LayerBuilder).
func (p *priorChunks) ownIndex() int {
	if p == nil {
		return 0
	}
	return len(p.blobs)
}

// LayerBuilder builds the layers of one image in directory mode, lowest
// first, as nydus images are made: each layer's tar becomes a layer
// bootstrap (whiteout entries kept, for Merge to apply) and one blob of
// compressed chunks, and a chunk that an earlier layer's blob holds
// already is referenced there instead of being stored again. Every layer
// bootstrap lists the blobs of all earlier layers first (with the same
// entries, so Merge shares them by id), then its own.
type LayerBuilder struct {
	opts  Options
	prior priorChunks
}

// NewLayerBuilder starts an image's layers; opts as for FromDir.
func NewLayerBuilder(opts Options) (*LayerBuilder, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	return &LayerBuilder{opts: opts, prior: priorChunks{chunks: map[[32]byte]priorChunk{}}}, nil
}

// Add builds the next layer from its uncompressed tar (size bytes of r),
// writing its bootstrap to bootstrap and its blob (none when every chunk
// was seen before, or it has no file data) into BlobDir. name labels the
// layer in errors. The Result's Blobs hold the new blob only.
func (b *LayerBuilder) Add(ctx context.Context, r io.ReaderAt, size int64, name string, bootstrap io.Writer) (*Result, error) {
	if len(b.prior.blobs) >= rafs.MaxBlobs {
		return nil, fmt.Errorf("build: %s: more than %d blobs in one image", name, rafs.MaxBlobs)
	}
	tree, err := indexTar(ctx, r, size)
	if err != nil {
		return nil, fmt.Errorf("build: %s: %w", name, err)
	}
	// Regular files with data, each once (hard links share an inode), in
	// name order: the blob is the same for the same tar.
	var files []*inode
	seen := map[*inode]bool{}
	var walk func(dir *inode, p string)
	walk = func(dir *inode, p string) {
		names := make([]string, 0, len(dir.children))
		for k := range dir.children {
			names = append(names, k)
		}
		slices.Sort(names)
		for _, k := range names {
			in := dir.children[k]
			switch {
			case in.isDir():
				walk(in, p+"/"+k)
			case in.isReg() && in.meta.Size > 0 && !seen[in]:
				seen[in] = true
				in.tar, in.srcPath = r, name+":"+p+"/"+k
				files = append(files, in)
			}
		}
	}
	walk(tree.root, "")

	opts := b.opts
	opts.prior = &b.prior
	info, blob, pending, err := writeDirBlob(ctx, files, &opts)
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if pending != nil && !committed {
			os.Remove(pending.tmp)
		}
	}()
	root, err := toNodes(tree.root, nil)
	if err != nil {
		return nil, fmt.Errorf("build: %s: %w", name, err)
	}
	blobs := slices.Clone(b.prior.blobs)
	res := &Result{}
	if info != nil {
		blobs = append(blobs, *info)
		res.Blobs = append(res.Blobs, *blob)
	}
	res.Bootstrap, err = rafs.WriteBootstrap(bootstrap, root, blobs, rafs.WriteOptions{
		ChunkSize: opts.ChunkSize, Compressor: opts.Compressor, Digester: opts.Digester,
	})
	if err != nil {
		return nil, fmt.Errorf("build: %s: %w", name, err)
	}
	if pending != nil {
		if _, err := pending.commit(); err != nil {
			return nil, err
		}
		committed = true
	}
	if info != nil {
		bi := len(b.prior.blobs)
		for _, c := range info.Chunks {
			if _, ok := b.prior.chunks[c.Digest]; !ok {
				b.prior.chunks[c.Digest] = priorChunk{blob: bi, ci: c.Index, uoff: c.UncompressedOffset}
			}
		}
		b.prior.blobs = append(b.prior.blobs, *info)
	}
	return res, nil
}
