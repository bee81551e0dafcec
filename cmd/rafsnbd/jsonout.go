package main

import (
	"encoding/hex"
	"encoding/json"
	"io"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/verity"
)

// jsonFlag asks a command for its result as one JSON document on stdout
// (snake_case keys, durations in nanoseconds named _ns), for scripts.
func jsonFlag() cli.Flag {
	return &cli.BoolFlag{Name: "json", Usage: "print the result as JSON (snake_case keys) instead of text"}
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// verityJSON is a dm-verity tree as commands print it with --json.
type verityJSON struct {
	RootHash      string `json:"root_hash"`
	Options       string `json:"options"` // nydus' "dm-verity options: ..." line
	Algorithm     string `json:"hash"`
	Salt          string `json:"salt"` // hex, "" for none
	DataBlockSize int    `json:"data_block_size"`
	DataBlocks    uint64 `json:"data_blocks"`
	HashBlockSize int    `json:"hash_block_size"`
	HashBlocks    uint64 `json:"hash_blocks"`
	HashOffset    uint64 `json:"hash_offset"`
	Compat        string `json:"compat"`
}

func verityReport(t *verity.Tree) *verityJSON {
	p := t.Params
	return &verityJSON{
		RootHash: t.RootHex(), Options: t.Options(), Algorithm: p.Algorithm, Salt: hex.EncodeToString(p.Salt),
		DataBlockSize: p.DataBlockSize, DataBlocks: p.DataBlocks, HashBlockSize: p.HashBlockSize,
		HashBlocks: p.HashBlocks(), HashOffset: p.HashOffset, Compat: p.Compat.String(),
	}
}
