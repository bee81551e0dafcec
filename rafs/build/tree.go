package build

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// inode is a file being built. Directory entries point at inodes, so hard
// links are two entries holding the same *inode.
type inode struct {
	meta     rafs.Node         // everything but Name, Children and Link
	children map[string]*inode // directories only

	// Where a regular file's data comes from: a path (directory mode) or
	// an offset in the tar (tarfs mode).
	srcPath string
	dataOff int64
	// tar, when set, holds a directory-mode file's data at dataOff
	// (LayerBuilder); srcPath then only names it in errors.
	tar io.ReaderAt
}

func (i *inode) isDir() bool { return i.meta.Mode&rafs.ModeTypeMask == rafs.ModeDir }
func (i *inode) isReg() bool { return i.meta.Mode&rafs.ModeTypeMask == rafs.ModeRegular }

func newDir(mode uint32) *inode {
	in := &inode{children: make(map[string]*inode)}
	in.meta.Mode = rafs.ModeDir | mode&0o7777
	return in
}

// toNodes converts the inode tree into the writer's tree: directories in
// name order, the first name of every inode (depth first) carries it, later
// names link to it. visit sees each regular file once, in that order.
func toNodes(root *inode, visit func(*inode, *rafs.Node) error) (*rafs.Node, error) {
	seen := make(map[*inode]*rafs.Node)
	var conv func(in *inode, name string) (*rafs.Node, error)
	conv = func(in *inode, name string) (*rafs.Node, error) {
		if first, ok := seen[in]; ok {
			return &rafs.Node{Name: name, Link: first}, nil
		}
		n := new(rafs.Node)
		*n = in.meta
		n.Name = name
		seen[in] = n
		if in.isReg() && visit != nil {
			if err := visit(in, n); err != nil {
				return nil, err
			}
		}
		if in.isDir() {
			names := make([]string, 0, len(in.children))
			for k := range in.children {
				names = append(names, k)
			}
			slices.Sort(names)
			n.Children = make([]*rafs.Node, 0, len(names))
			for _, k := range names {
				c, err := conv(in.children[k], k)
				if err != nil {
					return nil, err
				}
				n.Children = append(n.Children, c)
			}
		}
		return n, nil
	}
	return conv(root, "")
}

// pathTree applies entries by path the way OCI layer extraction does:
// missing parents appear as 0755 directories, a later entry replaces an
// earlier one of the same name, and a directory over a directory only
// updates its metadata.
type pathTree struct {
	root *inode
}

func newPathTree() *pathTree { return &pathTree{root: newDir(0o755)} }

// parent returns the directory holding clean path p, creating missing
// directories on the way.
func (t *pathTree) parent(p string) (*inode, string, error) {
	dir := t.root
	elems := strings.Split(p, "/")
	for i, e := range elems[:len(elems)-1] {
		next, ok := dir.children[e]
		if !ok {
			next = newDir(0o755)
			dir.children[e] = next
		}
		if !next.isDir() {
			return nil, "", fmt.Errorf("parent %q is not a directory", strings.Join(elems[:i+1], "/"))
		}
		dir = next
	}
	return dir, elems[len(elems)-1], nil
}

// underNonDir reports whether a non-directory already in the tree stands
// at one of clean path p's parents.
func (t *pathTree) underNonDir(p string) bool {
	dir := t.root
	elems := strings.Split(p, "/")
	for _, e := range elems[:len(elems)-1] {
		next, ok := dir.children[e]
		if !ok {
			return false
		}
		if !next.isDir() {
			return true
		}
		dir = next
	}
	return false
}

// lookup finds clean path p without creating anything.
func (t *pathTree) lookup(p string) (*inode, bool) {
	in := t.root
	if p == "" {
		return in, true
	}
	for _, e := range strings.Split(p, "/") {
		if !in.isDir() {
			return nil, false
		}
		next, ok := in.children[e]
		if !ok {
			return nil, false
		}
		in = next
	}
	return in, true
}

// put places in at clean path p ("" is the root).
func (t *pathTree) put(p string, in *inode) error {
	if p == "" {
		if !in.isDir() {
			return fmt.Errorf("the root must be a directory")
		}
		t.root.meta = in.meta
		return nil
	}
	dir, base, err := t.parent(p)
	if err != nil {
		return err
	}
	if old, ok := dir.children[base]; ok && old.isDir() && in.isDir() {
		old.meta = in.meta
		return nil
	}
	dir.children[base] = in
	return nil
}
