"""Prior studies of the same patient, fetched from a PACS (C-FIND + C-GET) and handed to a plugin.

    sources:
      pacs: {ae_title: PACS1, host: 10.0.0.5, port: 104}
    rules:
      - name: chest-ct-follow-up
        series: {modality: CT}
        plugin: ct_nodule
        priors: {source: pacs, count: 1, same_modality: true, max_age_days: 3650, required: false}

The PACS must know the node's AE title as a modality allowed to query and retrieve (C-FIND, C-GET); in
Orthanc, a DicomModalities entry (AllowFind/AllowGet default to true there). A source used only for priors
takes `query: false`, so the assembler does not ask it for the instance counts of studies it never sends.

Modules: config (the rule's `priors:` section), association (one association for C-FIND and C-GET, and
why C-GET rather than C-MOVE), find (the patient's earlier studies and their image series), fetch (C-GET
into a per-job folder), retrieve (one job's priors, end to end, with its audit records).
Nothing is imported here, so node.config.schema can import node.priors.config without a cycle.
"""
