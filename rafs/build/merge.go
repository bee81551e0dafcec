package build

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Merging layer bootstraps into one image bootstrap, as `nydus-image merge`
// does for nydus-snapshotter's tarfs mode (spec §16).
//
// The merge works from the layers' bootstraps rather than from their tars:
// a converted layer is cached as its bootstrap, so an image whose layers
// were all seen before is merged without reading a single tar byte, and
// the merge needs nothing but what a bootstrap records. Each file keeps the
// chunk indexes its own layer's build gave it, with the blob index moved to
// the layer's place in the merged blob table, so every chunk still points
// into its own layer's tar.

// Whiteout names of the OCI image layer spec.
const (
	whiteoutPrefix = ".wh."
	// whiteoutMeta starts names reserved for whiteout metadata; the only
	// one with a meaning is the opaque marker.
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// MergeOptions control Merge.
type MergeOptions struct {
	// Names label the layers in error messages (their digests, say);
	// layer i is called "layer i" when Names has no entry for it.
	Names []string
	// Prefetch names files of the merged image (absolute paths) whose
	// inodes fill the bootstrap's prefetch table, in order; a path that
	// is not in the image is an error.
	Prefetch []string
}

func (o *MergeOptions) name(i int) string {
	if i < len(o.Names) && o.Names[i] != "" {
		return o.Names[i]
	}
	return fmt.Sprintf("layer %d", i)
}

// MergeFiles opens the layer bootstraps at paths (lowest layer first) and
// merges them with Merge.
func MergeFiles(ctx context.Context, paths []string, out io.Writer, opts MergeOptions) (*Result, error) {
	layers := make([]*rafs.Image, 0, len(paths))
	defer func() {
		for _, l := range layers {
			l.Close()
		}
	}()
	for i, p := range paths {
		img, err := rafs.Open(p)
		if err != nil {
			return nil, fmt.Errorf("build: merge: %s: %w", opts.name(i), err)
		}
		layers = append(layers, img)
	}
	return Merge(ctx, layers, out, opts)
}

// Merge writes to out the bootstrap of the image whose layers are the
// given bootstraps, lowest first, applied the way OCI layer extraction
// applies layers:
//
//   - a layer's entry replaces the lower entry of the same path, except
//     that a directory over a directory only takes the upper metadata and
//     keeps the lower contents; a file replaced by a directory (or the
//     reverse) loses the whole lower subtree;
//   - ".wh.NAME" deletes NAME (and what is below it) from the lower layers,
//     ".wh..wh..opq" empties its directory of lower entries; both act on
//     lower layers only, never on entries of their own layer, and neither
//     appears in the result (nor does any other ".wh." name); where the
//     lower layers have no directory above a whiteout (a file, or nothing)
//     it deletes nothing and creates no directory;
//   - hard links stay hard links within their layer;
//   - a directory that a layer's bootstrap holds only because the tar
//     named a path below it (mode 0755, owner 0:0, mtime 0, no xattrs: what
//     the tarfs builder gives a missing parent) leaves the lower
//     directory's metadata alone, as extraction leaves an existing
//     directory alone.
//
// Every blob of every layer becomes a blob of the image, in layer order (a
// blob id seen in an earlier layer is shared, not repeated), each at its
// own mapped_blkaddr in the flat device. All layers must agree on block
// size, chunk size, tarfs mode, compressor and digester.
//
// The returned Result's Blobs have no Path: Merge writes no blob.
func Merge(ctx context.Context, layers []*rafs.Image, out io.Writer, opts MergeOptions) (*Result, error) {
	if len(layers) == 0 {
		return nil, errors.New("build: merge: no layers")
	}
	first := layers[0]
	wopts := rafs.WriteOptions{
		BlockSizeBits: first.Superblock.BlkSzBits,
		ChunkSize:     first.ExtSuperblock.ChunkSize,
		Compressor:    first.Compressor(),
		Digester:      first.Digester(),
		Tarfs:         first.IsTarfs(),
	}
	m := &merger{ctx: ctx, root: &mergeNode{node: &rafs.Node{Mode: rafs.ModeDir | 0o755}, kids: map[string]*mergeNode{}}}
	blobIndex := map[string]int{}
	for i, img := range layers {
		name := opts.name(i)
		if err := compatibleLayer(img, wopts); err != nil {
			return nil, fmt.Errorf("build: merge: %s: %w", name, err)
		}
		// Place the layer's blobs in the image's blob table.
		remap := make([]int, len(img.Blobs))
		for j := range img.Blobs {
			e := img.Blobs[j]
			id := e.ID()
			if k, ok := blobIndex[id]; ok {
				prev := m.blobs[k].Entry
				if prev.UncompressedSize != e.UncompressedSize || prev.ChunkCount != e.ChunkCount || prev.Features != e.Features {
					return nil, fmt.Errorf("build: merge: %s: blob %s differs from the blob of the same id in a lower layer", name, id)
				}
				remap[j] = k
				continue
			}
			var chunks []rafs.ChunkInfo
			for _, c := range img.ChunkTable {
				if c.BlobIndex == uint32(j) {
					chunks = append(chunks, c)
				}
			}
			remap[j] = len(m.blobs)
			blobIndex[id] = len(m.blobs)
			m.blobs = append(m.blobs, rafs.BlobInfo{ID: id, Entry: e, Chunks: chunks})
		}

		tree, err := readLayerTree(img)
		if err != nil {
			return nil, fmt.Errorf("build: merge: %s: %w", name, err)
		}
		m.remap = remap
		m.byNid = map[uint64]*rafs.Node{}
		if !impliedDir(tree.e) {
			m.root.node = m.convert(tree.e)
		}
		if err := m.mergeDir(m.root, tree, "/"); err != nil {
			return nil, fmt.Errorf("build: merge: %s: %w", name, err)
		}
	}

	root := m.root.toNode("")
	for _, p := range opts.Prefetch {
		n := root
		for _, e := range strings.Split(strings.Trim(path.Clean("/"+p), "/"), "/") {
			if e == "" {
				break
			}
			i := slices.IndexFunc(n.Children, func(c *rafs.Node) bool { return c.Name == e })
			if i < 0 {
				return nil, fmt.Errorf("build: merge: prefetch path %q is not in the image", p)
			}
			n = n.Children[i]
		}
		if n.Link != nil {
			n = n.Link
		}
		wopts.Prefetch = append(wopts.Prefetch, n)
	}
	wres, err := rafs.WriteBootstrap(out, root, m.blobs, wopts)
	if err != nil {
		return nil, fmt.Errorf("build: merge: %w", err)
	}
	res := &Result{Bootstrap: wres}
	for _, b := range m.blobs {
		res.Blobs = append(res.Blobs, Blob{
			ID:               b.ID,
			Size:             int64(b.Entry.CompressedSize),
			UncompressedSize: b.Entry.UncompressedSize,
			Chunks:           b.Entry.ChunkCount,
		})
	}
	return res, nil
}

// compatibleLayer checks that a layer can share a bootstrap with the first.
func compatibleLayer(img *rafs.Image, w rafs.WriteOptions) error {
	switch {
	case img.Superblock.BlkSzBits != w.BlockSizeBits:
		return fmt.Errorf("block size %d differs from the first layer's %d", img.BlockSize, 1<<w.BlockSizeBits)
	case img.ExtSuperblock.ChunkSize != w.ChunkSize:
		return fmt.Errorf("chunk size %d differs from the first layer's %d", img.ExtSuperblock.ChunkSize, w.ChunkSize)
	case img.IsTarfs() != w.Tarfs:
		return fmt.Errorf("tarfs mode %v differs from the first layer's %v", img.IsTarfs(), w.Tarfs)
	case img.Compressor() != w.Compressor:
		return fmt.Errorf("compressor %v differs from the first layer's %v", img.Compressor(), w.Compressor)
	case img.Digester() != w.Digester:
		return fmt.Errorf("digester %v differs from the first layer's %v", img.Digester(), w.Digester)
	}
	return nil
}

// layerNode is one entry of a layer as its bootstrap has it.
type layerNode struct {
	e    *rafs.Entry
	kids []layerChild // directories only, in name order
}

type layerChild struct {
	name string
	n    *layerNode
}

// readLayerTree reads a layer's whole tree. Walk validates it on the way
// (no cycles, no hard-linked directories, consistent "..").
func readLayerTree(img *rafs.Image) (*layerNode, error) {
	var root *layerNode
	dirs := map[string]*layerNode{}
	err := img.Walk(func(p string, e *rafs.Entry) error {
		n := &layerNode{e: e}
		if e.IsDir() {
			dirs[p] = n
		}
		if p == "/" {
			root = n
			return nil
		}
		parent := dirs[path.Dir(p)]
		if parent == nil {
			return fmt.Errorf("%s: parent not visited first", p)
		}
		parent.kids = append(parent.kids, layerChild{name: path.Base(p), n: n})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if root == nil || !root.e.IsDir() {
		return nil, errors.New("the root is not a directory")
	}
	return root, nil
}

// impliedDir reports whether a directory looks like one the tarfs builder
// made up for a path below it (see Merge).
func impliedDir(e *rafs.Entry) bool {
	return e.Mode == rafs.ModeDir|0o755 && e.UID == 0 && e.GID == 0 &&
		e.Mtime == 0 && e.MtimeNsec == 0 && len(e.Xattrs) == 0
}

// onlyWhiteouts reports whether a layer directory holds whiteouts and
// nothing else but implied directories holding only whiteouts. An empty
// directory does not count: it may be an explicit one that merely looks
// implied (a reproducible build's mtime 0).
func onlyWhiteouts(n *layerNode) bool {
	for _, c := range n.kids {
		if strings.HasPrefix(c.name, whiteoutPrefix) {
			continue
		}
		if !c.n.e.IsDir() || !impliedDir(c.n.e) || !onlyWhiteouts(c.n) {
			return false
		}
	}
	return len(n.kids) > 0
}

// mergeNode is an entry of the image being merged.
type mergeNode struct {
	node *rafs.Node            // Link is set for the extra names of a hard-linked inode
	kids map[string]*mergeNode // directories only
}

type merger struct {
	ctx   context.Context
	root  *mergeNode
	blobs []rafs.BlobInfo
	// Per layer: where the layer's blob indexes went, and the node made
	// for each inode so far, so that its other names become hard links.
	remap []int
	byNid map[uint64]*rafs.Node
}

// mergeDir applies the layer directory src over the image directory dst.
func (m *merger) mergeDir(dst *mergeNode, src *layerNode, dir string) error {
	if err := m.ctx.Err(); err != nil {
		return err
	}
	// Whiteouts first: they act on the lower layers only, so an entry of
	// this layer must not be deleted by a whiteout that sorts after it.
	for _, c := range src.kids {
		if c.name == whiteoutOpaque {
			clear(dst.kids)
		}
	}
	for _, c := range src.kids {
		if target, ok := strings.CutPrefix(c.name, whiteoutPrefix); ok && !strings.HasPrefix(c.name, whiteoutMeta) {
			delete(dst.kids, target)
		}
	}
	for _, c := range src.kids {
		if strings.HasPrefix(c.name, whiteoutPrefix) {
			continue
		}
		p := path.Join(dir, c.name)
		old := dst.kids[c.name]
		if !c.n.e.IsDir() {
			dst.kids[c.name] = m.leaf(c.n.e)
			continue
		}
		if old == nil || old.kids == nil {
			if impliedDir(c.n.e) && onlyWhiteouts(c.n) {
				// No lower directory here for the whiteouts to act on:
				// they delete nothing, and the directories the tar
				// implied to hold them are not the layer's entries, so
				// a lower non-directory stays (as with umoci).
				continue
			}
			old = &mergeNode{node: m.convert(c.n.e), kids: map[string]*mergeNode{}}
			dst.kids[c.name] = old
		} else if !impliedDir(c.n.e) {
			old.node = m.convert(c.n.e)
		}
		if err := m.mergeDir(old, c.n, p); err != nil {
			return err
		}
	}
	return nil
}

// leaf makes the image entry of a non-directory: the inode's first name in
// this layer carries it, later names link to it.
func (m *merger) leaf(e *rafs.Entry) *mergeNode {
	if first, ok := m.byNid[e.Nid]; ok {
		return &mergeNode{node: &rafs.Node{Link: first}}
	}
	n := m.convert(e)
	m.byNid[e.Nid] = n
	return &mergeNode{node: n}
}

// convert turns a layer inode into a writer node, its chunks moved to the
// image's blob indexes.
func (m *merger) convert(e *rafs.Entry) *rafs.Node {
	n := &rafs.Node{
		Mode:      uint32(e.Mode),
		UID:       e.UID,
		GID:       e.GID,
		Mtime:     int64(e.Mtime),
		MtimeNsec: e.MtimeNsec,
		Target:    e.Target,
	}
	if len(e.Xattrs) > 0 {
		n.Xattrs = make(map[string][]byte, len(e.Xattrs))
		for _, x := range e.Xattrs {
			n.Xattrs[x.Name] = slices.Clone(x.Value)
		}
	}
	switch e.Mode & rafs.ModeTypeMask {
	case rafs.ModeChar, rafs.ModeBlock:
		n.RdevMajor, n.RdevMinor = rafs.DecodeRdev(e.Rdev)
	case rafs.ModeRegular:
		n.Size = e.Size
		n.ChunkSize = e.ChunkSize
		n.Chunks = make([]rafs.ChunkIndex, len(e.Chunks))
		for k, c := range e.Chunks {
			if c.BlkAddr == rafs.NullBlkAddr {
				n.Chunks[k] = c
				continue
			}
			// The reader validated the blob index against the layer's table.
			n.Chunks[k] = rafs.NewChunkIndex(m.remap[c.BlobIndex()], c.CIIndex(), c.BlkAddr)
		}
	}
	return n
}

// toNode builds the writer's tree; children are sorted by the writer.
func (mn *mergeNode) toNode(name string) *rafs.Node {
	n := mn.node
	if n.Link == nil && n.Mode&rafs.ModeTypeMask == rafs.ModeDir {
		// A directory's node is never shared, so it can be filled in place.
		n.Children = make([]*rafs.Node, 0, len(mn.kids))
		for k, c := range mn.kids {
			n.Children = append(n.Children, c.toNode(k))
		}
	}
	n.Name = name
	return n
}
