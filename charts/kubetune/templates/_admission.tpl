{{/*
CEL of the admission policy on the operator's writes (admissionpolicy.yaml). Each kind has a
policy of its own, so every expression type-checks against that kind's schema; the rules on
labels and owners are shared. The operator's renderings (kubetune.operator.render) satisfy
every rule; tests/operator/test_least_privilege.py checks both sides on a real API server.
*/}}

{{- define "kubetune.admission.childVariables" -}}
- name: labels
  expression: "has(object.metadata.labels) ? object.metadata.labels : {}"
- name: jobName
  expression: "'kubetune.io/job-name' in variables.labels ? variables.labels['kubetune.io/job-name'] : ''"
- name: controllers
  expression: >-
    (has(object.metadata.ownerReferences) ? object.metadata.ownerReferences : [])
    .filter(r, has(r.controller) && r.controller)
{{- end -}}

{{- define "kubetune.admission.childValidations" -}}
- expression: >-
    variables.jobName != '' &&
    variables.labels[?'app.kubernetes.io/managed-by'].orValue('') == 'kubetune-operator'
  message: >-
    the kubetune operator writes only its own children: labels kubetune.io/job-name and
    app.kubernetes.io/managed-by=kubetune-operator are required
- expression: >-
    size(variables.controllers) == 1 &&
    variables.controllers[0].apiVersion.startsWith('kubetune.io/') &&
    variables.controllers[0].kind == 'FineTuneJob' &&
    variables.controllers[0].name == variables.jobName
  message: >-
    the kubetune operator writes only its own children: the controller ownerReference must be
    the kubetune.io FineTuneJob named by label kubetune.io/job-name
{{- end -}}

{{- define "kubetune.admission.jobVariables" -}}
- name: pod
  expression: object.spec.template.spec
- name: podSecurity
  expression: "has(variables.pod.securityContext) ? variables.pod.securityContext : {}"
- name: containers
  expression: "variables.pod.containers + (has(variables.pod.initContainers) ? variables.pod.initContainers : [])"
{{- end -}}

{{- define "kubetune.admission.jobValidations" -}}
- expression: >-
    variables.containers.all(c,
      (has(c.securityContext) && has(c.securityContext.runAsNonRoot)
        ? c.securityContext.runAsNonRoot : variables.podSecurity.?runAsNonRoot.orValue(false)) &&
      (has(c.securityContext) && has(c.securityContext.runAsUser)
        ? c.securityContext.runAsUser : variables.podSecurity.?runAsUser.orValue(1)) != 0)
  message: >-
    trainer pods run as non-root: spec.template.spec.securityContext.runAsNonRoot must be true
    (or set on every container) and runAsUser must not be 0
- expression: >-
    variables.containers.all(c, !has(c.securityContext) ||
      !c.securityContext.?privileged.orValue(false))
  message: "no privileged containers: securityContext.privileged must not be true"
- expression: >-
    variables.containers.all(c, has(c.securityContext) &&
      !c.securityContext.?allowPrivilegeEscalation.orValue(true))
  message: "every container sets securityContext.allowPrivilegeEscalation: false"
- expression: >-
    variables.containers.all(c, !has(c.securityContext) ||
      c.securityContext.?capabilities.?add.orValue([]).all(cap, cap == 'NET_BIND_SERVICE'))
  message: "no added capabilities (NET_BIND_SERVICE aside)"
- expression: >-
    !variables.pod.?hostNetwork.orValue(false) && !variables.pod.?hostPID.orValue(false) &&
    !variables.pod.?hostIPC.orValue(false)
  message: "no host namespaces: hostNetwork, hostPID and hostIPC must not be true"
- expression: "variables.pod.?volumes.orValue([]).all(v, !has(v.hostPath))"
  message: "no hostPath volumes"
- expression: >-
    variables.containers.all(c, c.?ports.orValue([]).all(p, p.?hostPort.orValue(0) == 0))
  message: "no hostPort on any container port"
- expression: >-
    variables.pod.?serviceAccountName.orValue('') in ['', 'default'] &&
    !variables.pod.?automountServiceAccountToken.orValue(true)
  message: >-
    trainer pods use the namespace's default ServiceAccount without a token:
    no serviceAccountName, and automountServiceAccountToken: false
{{- end -}}

{{- define "kubetune.admission.serviceVariables" -}}
{{- end -}}

{{- define "kubetune.admission.serviceValidations" -}}
- expression: >-
    object.spec.?type.orValue('') == 'ClusterIP' && object.spec.?clusterIP.orValue('') == 'None'
  message: "Services are headless: type ClusterIP with clusterIP None (no ExternalName, NodePort or LoadBalancer)"
- expression: "size(object.spec.?externalIPs.orValue([])) == 0"
  message: "Services have no externalIPs"
{{- end -}}
